//! Signing-key rotation under load: tokens are issued without pause while `tessera rotate-key`
//! runs; every token, old or new, verifies against the JWKS the agent publishes afterwards.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use support::{Agent, Servers, TestCgroup, Workload, privileged, standard_policy};

const ROTATIONS: usize = 3;

#[test]
fn tokens_issued_across_rotations_all_verify() {
    if !privileged() {
        return;
    }
    let servers = Servers::start();
    let cg = TestCgroup::new("rotation");
    let (app, _) = cg.child("app");
    let _ = cg.child("other");
    let agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port, "enforce"),
        &cg.path,
        &[],
    );

    // Tokens without pause, on a thread of their own, while the main thread rotates.
    let stop = Arc::new(AtomicBool::new(false));
    let issuer = {
        let stop = stop.clone();
        let mut w = Workload::spawn(&app, &agent.api);
        std::thread::spawn(move || {
            let mut tokens = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = w.token("vault", Some(120));
                assert_eq!(status, 200, "credential refused during rotation: {body}");
                tokens.push(body["token"].as_str().expect("token").to_owned());
            }
            let connect = w.connect4(servers.tcp_port);
            (tokens, connect)
        })
    };
    let admin = agent.admin.to_str().expect("utf-8").to_owned();
    let mut kids = Vec::new();
    for _ in 0..ROTATIONS {
        std::thread::sleep(Duration::from_millis(300));
        let (code, out, err) = agent.cli(&["rotate-key", "--admin-socket", &admin]);
        assert_eq!(code, 0, "rotate-key failed: {out}{err}");
        assert!(out.contains("stays published until"), "{out}");
        kids.push(out.split_whitespace().nth(2).expect("new kid").to_owned());
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (tokens, connect) = issuer.join().expect("issuer thread");
    // Clients were not interrupted: the last credential still opens the endpoint.
    assert_eq!(connect, "ok");

    let mut w = Workload::spawn(&app, &agent.api);
    let (status, jwks) = w.raw("GET", "/v1/jwks", None);
    assert_eq!(status, 200);
    let set: JwkSet = serde_json::from_value(jwks.clone()).expect("JWKS");
    assert_eq!(set.keys.len(), ROTATIONS + 1, "every key published: {jwks}");
    assert_eq!(
        set.keys[0].common.key_id.as_deref(),
        kids.last().map(String::as_str)
    );

    let mut signed_by = std::collections::BTreeMap::<String, usize>::new();
    for token in &tokens {
        let header = jsonwebtoken::decode_header(token).expect("header");
        let kid = header.kid.expect("kid");
        let jwk = set
            .find(&kid)
            .unwrap_or_else(|| panic!("kid {kid} not published: {jwks}"));
        let key = DecodingKey::from_jwk(jwk).expect("key");
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["vault"]);
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .unwrap_or_else(|e| panic!("a token of key {kid} does not verify: {e}"));
        *signed_by.entry(kid).or_default() += 1;
    }
    assert!(
        signed_by.len() >= 2,
        "tokens from before and after a rotation: {signed_by:?} ({} tokens)",
        tokens.len()
    );
    eprintln!(
        "{} tokens over {} rotations, by key: {signed_by:?}",
        tokens.len(),
        ROTATIONS
    );
}

#[test]
fn the_schedule_rotates_and_keeps_the_old_key_published() {
    if !privileged() {
        return;
    }
    let servers = Servers::start();
    let cg = TestCgroup::new("rotation-schedule");
    let (app, _) = cg.child("app");
    let _ = cg.child("other");
    let agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port, "enforce"),
        &cg.path,
        &["--key-rotation", "1s"],
    );
    let mut w = Workload::spawn(&app, &agent.api);
    let (status, body) = w.token("vault", Some(60));
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().expect("token").to_owned();
    let kid = jsonwebtoken::decode_header(&token)
        .expect("header")
        .kid
        .expect("kid");
    // A rotation after this token (one may have run before it: the key is 1 s old at once).
    let rotations = |a: &Agent| a.agent_log().matches("signing key rotated").count();
    let before = rotations(&agent);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while rotations(&agent) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            agent.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, jwks) = w.raw("GET", "/v1/jwks", None);
    let set: JwkSet = serde_json::from_value(jwks.clone()).expect("JWKS");
    assert!(set.keys.len() >= 2, "{jwks}");
    assert_ne!(set.keys[0].common.key_id.as_deref(), Some(kid.as_str()));
    // The token of the retired key still verifies (its key is published until it expires).
    let key = DecodingKey::from_jwk(set.find(&kid).expect("old key published")).expect("key");
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&["vault"]);
    jsonwebtoken::decode::<Value>(&token, &key, &v).expect("old token verifies");
    let (status, body) = w.token("vault", Some(60));
    assert_eq!(status, 200, "{body}");
}
