//! The trust bundle objects against a loopback API server: this agent's object applied (and
//! written again when it goes), the others' keys gathered, another trust domain's objects and
//! malformed ones ignored; and the names checked.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::testkit::apiserver::FakeApiServer;

const CONFIGMAPS: &str = "/api/v1/configmaps";

fn key(kid: &str) -> Value {
    json!({ "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "jwt-svid",
            "x": "3C-_E-5LlKAVOXO-WCnAR7ryDtr7A9fokF4E-qLVkIQ",
            "y": "_lZkvq1Qv-Z5fg1-95tJcRM61oRIyxc-wD8OdI3X7tw" })
}

fn object(namespace: &str, name: &str, domain: &str, jwks: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": namespace, "labels": { LABEL: domain } },
        "data": { DATA_KEY: jwks },
    })
}

/// Puts the object `name` of `namespace` holding the keys `kids`.
fn put_keys(server: &FakeApiServer, namespace: &str, name: &str, domain: &str, kids: &[&str]) {
    let keys: Vec<Value> = kids.iter().map(|k| key(k)).collect();
    let jwks = json!({ "keys": keys }).to_string();
    server.put(CONFIGMAPS, object(namespace, name, domain, &jwks));
}

fn configmap(value: Value) -> ConfigMap {
    serde_json::from_value(value).expect("a ConfigMap")
}

/// Guards against a hang only; no assertion depends on time.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}

fn kids(keys: &[Value]) -> Vec<String> {
    let mut kids: Vec<String> = keys
        .iter()
        .map(|k| k["kid"].as_str().unwrap_or_default().to_owned())
        .collect();
    kids.sort();
    kids
}

#[test]
fn keys_are_read_from_objects_of_the_trust_domain_only() {
    let jwks = json!({ "keys": [key("a")] }).to_string();
    let good = configmap(object("t", "x", "example.org", &jwks));
    assert_eq!(keys_of(&good, "example.org"), Ok(vec![key("a")]));
    assert_eq!(keys_of(&good, "other.org"), Err(Unused::OtherDomain));
    let mut unlabelled = object("t", "x", "example.org", &jwks);
    unlabelled["metadata"]["labels"] = json!({});
    assert_eq!(
        keys_of(&configmap(unlabelled), "example.org"),
        Err(Unused::OtherDomain)
    );
    for (text, says) in [
        ("not json", "is not JSON"),
        ("{\"keys\": 3}", "no \"keys\" list"),
        (
            "{\"keys\": [{\"kty\": \"EC\", \"alg\": \"ES256\"}]}",
            "keys[0] lacks",
        ),
    ] {
        match keys_of(
            &configmap(object("t", "x", "example.org", text)),
            "example.org",
        ) {
            Err(Unused::Malformed(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    let mut empty = object("t", "x", "example.org", "");
    empty["data"] = json!({});
    match keys_of(&configmap(empty), "example.org") {
        Err(Unused::Malformed(why)) => assert!(why.contains("no data key jwks.json"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn names_are_checked() {
    let place = BundlePlace::new("tessera", "node-1", "example.org").expect("place");
    assert_eq!(place.name, "tessera-bundle-node-1");
    assert_eq!(place.selector(), "tessera.dev/trust-bundle=example.org");
    assert!(matches!(
        BundlePlace::new("tessera", "", "example.org"),
        Err(BundleK8sError::NoNodeName)
    ));
    for namespace in ["", "Tessera", "-a", "a_b", &"a".repeat(64)] {
        assert!(
            matches!(
                BundlePlace::new(namespace, "n", "example.org"),
                Err(BundleK8sError::Namespace(_))
            ),
            "{namespace:?}"
        );
    }
    let long = format!("{}.org", "a".repeat(60));
    assert!(matches!(
        BundlePlace::new("tessera", "n", &long),
        Err(BundleK8sError::TrustDomainLabel(_))
    ));
    let node = "n".repeat(250);
    let name = BundlePlace::new("tessera", &node, "example.org")
        .expect("place")
        .name;
    assert!(name.len() <= 253 && name.starts_with(NAME_PREFIX), "{name}");
}

#[tokio::test]
async fn each_agent_applies_its_object_and_gathers_the_others() {
    let server = FakeApiServer::start().await;
    let place = BundlePlace::new("tessera", "node-a", "example.org").expect("place");
    put_keys(
        &server,
        "tessera",
        "tessera-bundle-node-b",
        "example.org",
        &["b1", "b2"],
    );
    // Another trust domain's, and one in another namespace: neither is read.
    put_keys(
        &server,
        "tessera",
        "tessera-bundle-node-x",
        "other.org",
        &["x"],
    );
    put_keys(
        &server,
        "elsewhere",
        "tessera-bundle-node-y",
        "example.org",
        &["y"],
    );
    let bundle = K8sBundle::spawn(server.client(), place.clone());
    within("the first list", bundle.wait_synced()).await;
    assert_eq!(kids(&bundle.others()), ["b1", "b2"]);

    // This agent's keys: applied to its own object only, with its field manager.
    bundle.publish(&json!({ "keys": [key("a")] }));
    let own = || server.get(CONFIGMAPS, "tessera", "tessera-bundle-node-a");
    within("the object", server.wait_until(|_| own().is_some())).await;
    let written = own().expect("object");
    assert_eq!(written["metadata"]["labels"][LABEL], "example.org");
    assert_eq!(
        written["metadata"]["annotations"][NODE_ANNOTATION],
        "node-a"
    );
    let data: Value =
        serde_json::from_str(written["data"][DATA_KEY].as_str().expect("jwks")).expect("JSON");
    assert_eq!(data, json!({ "keys": [key("a")] }));
    let patches = server.patches();
    assert!(
        patches.iter().all(|(path, _)| path
            .starts_with("/api/v1/namespaces/tessera/configmaps/tessera-bundle-node-a?")
            && path.contains("fieldManager=tessera-agent")),
        "{patches:?}"
    );
    assert_eq!(
        kids(&bundle.others()),
        ["b1", "b2"],
        "its own keys are not others'"
    );

    // A new key of node B, then a malformed object: the first counts, the second changes nothing.
    let mut changes = bundle.changes();
    changes.borrow_and_update();
    put_keys(
        &server,
        "tessera",
        "tessera-bundle-node-b",
        "example.org",
        &["b3"],
    );
    within("the change", changes.changed()).await.expect("open");
    assert_eq!(kids(&bundle.others()), ["b3"]);
    server.put(
        CONFIGMAPS,
        object("tessera", "tessera-bundle-node-c", "example.org", "{"),
    );
    put_keys(
        &server,
        "tessera",
        "tessera-bundle-node-d",
        "example.org",
        &["d"],
    );
    within("the change", changes.changed()).await.expect("open");
    assert_eq!(kids(&bundle.others()), ["b3", "d"]);

    // Its own object deleted (by hand): written again. Node B's deleted: its keys go.
    let applies = server.patches().len();
    server.delete(CONFIGMAPS, "tessera", "tessera-bundle-node-a");
    within(
        "the object again",
        server.wait_until(|s| s.patches().len() > applies && own().is_some()),
    )
    .await;
    server.delete(CONFIGMAPS, "tessera", "tessera-bundle-node-b");
    within("the change", changes.changed()).await.expect("open");
    assert_eq!(kids(&bundle.others()), ["d"]);

    // A watch that ends is resumed: nothing is missed.
    server.end_watches();
    put_keys(
        &server,
        "tessera",
        "tessera-bundle-node-e",
        "example.org",
        &["e"],
    );
    within("node e", async {
        while !kids(&bundle.others()).contains(&"e".to_owned()) {
            changes.changed().await.expect("open");
        }
    })
    .await;
}
