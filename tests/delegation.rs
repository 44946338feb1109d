//! Delegation and outside tokens (privileged): a test issuer (its P-256 keys generated here,
//! its JWKS in a file the policy trusts) signs a person's token and CI job tokens; the real
//! daemon verifies them on real credential requests. A person's token makes a credential that
//! names them (`obo`) and ends with their token; forged, expired, wrong-audience, wrong-issuer,
//! `alg: none` and HMAC-with-the-public-key tokens are refused with their reasons; a rule's
//! `match.token` lets only the CI job of one repository and branch through; the issuance
//! module sees the verified claims; a rotated key is picked up. And `tessera check` on bad
//! `trustedIssuers`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::EncodePrivateKey;
use serde_json::{Value, json};
use support::{Agent, Servers, TESSERA, TestCgroup, Workload, jwt_claims, privileged};

const PEOPLE: &str = "https://login.test.example";
const CI: &str = "https://ci.test.example";

/// One signing key of the test issuer.
struct IssuerKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl IssuerKey {
    fn generate(kid: &str) -> Self {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let der = secret.to_pkcs8_der().expect("pkcs8");
        let point = secret.public_key().to_encoded_point(false);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(point.x().expect("x")),
            "y": URL_SAFE_NO_PAD.encode(point.y().expect("y")),
        });
        IssuerKey {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_der(der.as_bytes()),
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

fn jwks(keys: &[&IssuerKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A person's claims from the people issuer, valid for `ttl` seconds.
fn person(sub: &str, ttl: i64) -> Value {
    let now = now() as i64;
    json!({"iss": PEOPLE, "sub": sub, "aud": "tessera", "iat": now, "nbf": now, "exp": now + ttl,
           "email": format!("{sub}@test.example"), "groups": ["payments"]})
}

/// A CI job's claims (in the style of a CI system's OIDC job token).
fn ci_job(repository: &str, git_ref: &str) -> Value {
    let now = now();
    json!({"iss": CI, "sub": format!("repo:{repository}:ref:{git_ref}"), "aud": ["tessera"],
           "iat": now, "exp": now + 300, "repository": repository, "ref": git_ref,
           "run_attempt": 1})
}

/// An HS256 token naming the key `kid`, its HMAC keyed with `secret`.
fn hs256(kid: &str, claims: &Value, secret: &[u8]) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign")
}

/// `app` may reach `vault` (any request) and `deploy` (only with a CI job token of
/// acme/app on main); both through `module`, which echoes the request it sees for task `echo`.
fn policy(rel: &str, port: u16, dir: &Path) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: delegation\nspec:\n  \
         trustDomain: test.tessera.dev\n  issuance: {{ rego: {module} }}\n  trustedIssuers:\n    \
         - name: people\n      issuer: {PEOPLE}\n      audiences: [tessera]\n      jwks: {{ file: {people} }}\n    \
         - name: ci\n      issuer: {CI}\n      audiences: [tessera, other]\n      jwks: {{ file: {ci} }}\n  \
         workloads:\n    - name: app\n      match:\n        cgroup: {rel}/app\n  endpoints:\n    \
         - name: vault\n      addresses: [\"127.0.0.1/32\"]\n      ports: [{port}]\n    \
         - name: deploy\n      addresses: [\"127.0.0.2/32\"]\n      ports: [{port}]\n  rules:\n    \
         - name: app-to-vault\n      workloads: [app]\n      endpoints: [vault]\n      \
         credential: {{ required: true, maxTtl: 10m, bind: process }}\n    \
         - name: app-to-deploy\n      workloads: [app]\n      endpoints: [deploy]\n      \
         credential: {{ required: true, maxTtl: 10m, bind: process }}\n      \
         match:\n        token:\n          issuer: ci\n          claims: {{ repository: acme/app, ref: refs/heads/main }}\n",
        module = dir.join("module.rego").display(),
        people = dir.join("people.jwks.json").display(),
        ci = dir.join("ci.jwks.json").display(),
    )
}

const MODULE: &str = r#"package test.delegation

decision := {"allow": true} if input.request.task != "echo"

decision := {"allow": false, "reasons": [json.marshal(input)]} if input.request.task == "echo"
"#;

fn ask(w: &mut Workload, body: Value) -> (u16, Value) {
    w.raw("POST", "/v1/credentials", Some(&body.to_string()))
}

/// Asks for `vault` with `subject_token`, expects 403 `untrusted_token` with `why` in the error.
fn refused_subject(w: &mut Workload, token: &str, why: &str) {
    let (status, body) = ask(w, json!({"audience": "vault", "subject_token": token}));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("untrusted_token")),
        "{why}: {body}"
    );
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("subject_token is refused: ") && error.contains(why),
        "expected {why:?}: {body}"
    );
}

/// `tessera_issuance_tokens_total{kind, result}` now (0 when absent).
fn token_count(agent: &Agent, kind: &str, result: &str) -> u64 {
    agent.metric(&format!(
        "tessera_issuance_tokens_total{{kind=\"{kind}\",result=\"{result}\"}}"
    ))
}

/// Every file under `dir`, as text where it is one.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    out
}

#[test]
fn a_person_and_a_ci_job_are_verified_and_forgeries_refused() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("delegation");
    let (app_cg, _) = cg.child("app");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let dir = tempfile::tempdir().unwrap();
    let people = IssuerKey::generate("people-1");
    let ci = IssuerKey::generate("ci-1");
    std::fs::write(dir.path().join("people.jwks.json"), jwks(&[&people])).unwrap();
    std::fs::write(dir.path().join("ci.jwks.json"), jwks(&[&ci])).unwrap();
    std::fs::write(dir.path().join("module.rego"), MODULE).unwrap();
    let agent = Agent::start(
        &policy(&cg.rel, port, dir.path()),
        &cg.path,
        &["--metrics-addr", "127.0.0.1:0"],
    );
    let started = Instant::now();
    let mut w = Workload::spawn(&app_cg, &agent.api);
    assert_eq!(w.connect4(port), "EPERM", "no credential yet");

    // Alice's token lives 120 s: 600 s asked, at most 120 s given; `sub` stays the agent's.
    let alice = people.sign(&person("alice", 120));
    let (status, body) = ask(
        &mut w,
        json!({"audience": "vault", "task": "report", "ttl_seconds": 600, "subject_token": alice}),
    );
    assert_eq!(status, 200, "{body}");
    let issued = body["token"].as_str().unwrap().to_owned();
    let c = jwt_claims(&issued);
    assert_eq!(c["sub"], "spiffe://test.tessera.dev/app", "{c}");
    assert_eq!(c["obo"], json!({"iss": PEOPLE, "sub": "alice"}), "{c}");
    let alice_exp = jwt_claims(&alice)["exp"].as_u64().unwrap();
    assert!(c["exp"].as_u64().unwrap() <= alice_exp, "{c}");
    assert!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap() <= 120,
        "{c}"
    );
    assert_eq!(w.connect4(port), "ok", "the kernel grant is real");
    // Without a person: no `obo`, the rule's TTL.
    let (status, body) = ask(&mut w, json!({"audience": "vault", "ttl_seconds": 600}));
    assert_eq!(status, 200, "{body}");
    let c = jwt_claims(body["token"].as_str().unwrap());
    assert!(c.get("obo").is_none(), "{c}");
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 600);

    // Forged: the people key's kid, another key's signature.
    let forger = IssuerKey::generate("people-1");
    refused_subject(
        &mut w,
        &forger.sign(&person("alice", 120)),
        "signature does not verify",
    );
    refused_subject(&mut w, &people.sign(&person("alice", -600)), "expired");
    let mut wrong_aud = person("alice", 120);
    wrong_aud["aud"] = json!("someone-else");
    refused_subject(&mut w, &people.sign(&wrong_aud), "aud holds none");
    let mut wrong_iss = person("alice", 120);
    wrong_iss["iss"] = json!("https://evil.test.example");
    refused_subject(
        &mut w,
        &people.sign(&wrong_iss),
        "is not one of the policy's trustedIssuers",
    );
    let mut early = person("alice", 600);
    early["nbf"] = json!(now() + 300);
    refused_subject(&mut w, &people.sign(&early), "not valid yet");
    // Unsigned.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": "people-1"}).to_string()),
        URL_SAFE_NO_PAD.encode(person("alice", 120).to_string())
    );
    refused_subject(&mut w, &none, "alg is `none`");
    // Key confusion: HMAC keyed with the issuer's public key (its JWKS entry, its x).
    for secret in [
        people.jwk.to_string().into_bytes(),
        URL_SAFE_NO_PAD
            .decode(people.jwk["x"].as_str().unwrap())
            .unwrap(),
    ] {
        let confused = hs256("people-1", &person("alice", 120), &secret);
        refused_subject(&mut w, &confused, "algorithm confusion");
    }
    // This agent's own credential is not a person.
    refused_subject(&mut w, &issued, "credential of this agent");
    refused_subject(&mut w, "not-a-jwt", "not a well-formed JWT");

    // The CI job of acme/app on main may deploy; on another branch, another repository, or
    // with no token, it may not.
    let main = ci.sign(&ci_job("acme/app", "refs/heads/main"));
    let (status, body) = ask(
        &mut w,
        json!({"audience": "deploy", "evidence_tokens": [main]}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        jwt_claims(body["token"].as_str().unwrap())
            .get("obo")
            .is_none()
    );
    for token in [
        ci.sign(&ci_job("acme/app", "refs/heads/dev")),
        ci.sign(&ci_job("acme/other", "refs/heads/main")),
    ] {
        let (status, body) = ask(
            &mut w,
            json!({"audience": "deploy", "evidence_tokens": [token]}),
        );
        assert_eq!(
            (status, body["reason"].as_str()),
            (403, Some("evidence_not_matched")),
            "{body}"
        );
        assert!(
            body["error"].as_str().unwrap().contains("app-to-deploy"),
            "{body}"
        );
    }
    let (status, body) = ask(&mut w, json!({"audience": "deploy"}));
    assert_eq!(body["reason"], "evidence_not_matched", "{status} {body}");
    // A person's token is no CI evidence (another issuer), and a bad evidence token refuses.
    let (status, body) = ask(
        &mut w,
        json!({"audience": "deploy", "evidence_tokens": [people.sign(&person("alice", 120))]}),
    );
    assert_eq!(body["reason"], "evidence_not_matched", "{status} {body}");
    let (status, body) = ask(
        &mut w,
        json!({"audience": "deploy", "evidence_tokens": [IssuerKey::generate("ci-1").sign(&ci_job("acme/app", "refs/heads/main"))]}),
    );
    assert_eq!(body["reason"], "untrusted_token", "{status} {body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("evidence_tokens[0] is refused"),
        "{body}"
    );

    // The module sees the verified claims (and never a token).
    let (status, body) = ask(
        &mut w,
        json!({"audience": "vault", "task": "echo", "subject_token": alice, "evidence_tokens": [main]}),
    );
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("policy_denied")),
        "{body}"
    );
    let input: Value = serde_json::from_str(body["reasons"][0].as_str().unwrap()).unwrap();
    let obo = &input["request"]["on_behalf_of"];
    assert_eq!(obo["issuer"], "people", "{input}");
    assert_eq!(obo["iss"], PEOPLE, "{input}");
    assert_eq!(obo["sub"], "alice", "{input}");
    assert_eq!(obo["claims"]["email"], "alice@test.example", "{input}");
    assert_eq!(obo["claims"]["groups"], json!(["payments"]), "{input}");
    let evidence = &input["request"]["evidence_tokens"];
    assert_eq!(evidence[0]["issuer"], "ci", "{input}");
    assert_eq!(evidence[0]["claims"]["repository"], "acme/app", "{input}");
    let text = input.to_string();
    assert!(
        !text.contains(&alice) && !text.contains(&main),
        "a token in the input: {text}"
    );
    support::check_issuance_input_schema(&input);

    // Counted by kind and result.
    assert_eq!(token_count(&agent, "subject", "bad_signature"), 1);
    assert_eq!(token_count(&agent, "subject", "expired"), 1);
    assert_eq!(token_count(&agent, "subject", "wrong_audience"), 1);
    assert_eq!(token_count(&agent, "subject", "untrusted_issuer"), 1);
    assert_eq!(token_count(&agent, "subject", "unsigned"), 1);
    assert_eq!(token_count(&agent, "subject", "algorithm_mismatch"), 2);
    assert_eq!(token_count(&agent, "evidence", "bad_signature"), 1);
    assert!(token_count(&agent, "evidence", "verified") >= 4);

    // Rotation: the issuer publishes a new key; a token signed with it is taken once the
    // agent re-reads the JWKS (a kid it does not know, at most every 10 s).
    let rotated = IssuerKey::generate("people-2");
    let jwks_file = dir.path().join("people.jwks.json");
    let tmp = jwks_file.with_extension("tmp");
    std::fs::write(&tmp, jwks(&[&people, &rotated])).unwrap();
    std::fs::rename(&tmp, &jwks_file).unwrap();
    if let Some(wait) = Duration::from_secs(11).checked_sub(started.elapsed()) {
        thread::sleep(wait);
    }
    let bob = rotated.sign(&person("bob", 300));
    let (status, body) = ask(&mut w, json!({"audience": "vault", "subject_token": bob}));
    assert_eq!(status, 200, "{body}");
    let c = jwt_claims(body["token"].as_str().unwrap());
    assert_eq!(c["obo"]["sub"], "bob", "{c}");

    // No token in the agent's log, its decision log or its state.
    w.exit();
    let mut seen = files_under(agent.dir.path());
    seen.push((agent.agent_log.clone(), agent.agent_log()));
    for (path, text) in &seen {
        for token in [&alice, &main, &bob] {
            assert!(
                !text.contains(token.as_str()),
                "a person's or CI token in {}",
                path.display()
            );
        }
    }
}

#[test]
fn tessera_check_reports_bad_trusted_issuers_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let oct = dir.path().join("oct.jwks.json");
    std::fs::write(&oct, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#).unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: t.dev\n  \
         trustedIssuers:\n    - name: hmac\n      issuer: https://a.example\n      audiences: [x]\n      \
         jwks: { file: oct.jwks.json }\n    - name: remote\n      issuer: https://b.example\n      \
         audiences: [x]\n      jwks: { url: https://b.example/jwks }\n    - name: noaud\n      \
         issuer: https://c.example\n      jwks: { file: missing.json }\n  \
         workloads:\n    - name: w\n      match: { uid: 1000 }\n  endpoints:\n    \
         - name: e\n      addresses: [\"10.0.0.1/32\"]\n  rules:\n    - name: r\n      \
         workloads: [w]\n      endpoints: [e]\n      credential: { required: true, maxTtl: 1m, bind: process }\n      \
         match: { token: { issuer: nobody, claims: { a: b } } }\n",
    )
    .unwrap();
    let out = Command::new(TESSERA)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let place = |line: u32| format!("{}:{line}:", file.display());
    for (line, what) in [
        (9, "public keys only"),
        (13, "jwks.url is not supported yet"),
        (14, "trusted issuer has no audiences"),
        (28, "unknown trusted issuer `nobody`"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&place(line)) && l.contains(what)),
            "no {what:?} at line {line}:\n{err}"
        );
    }
}
