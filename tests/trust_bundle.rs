//! `--trust-bundle-dir`: two agents on one machine (two cgroups, two state directories, one
//! bundle directory); a token one issued validates through the other, after a rotation on the
//! first its old and new tokens both do (and the other's `FetchJWTBundles` stream sends the
//! new key), and still do once its file leaves the directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::{
    Agent, Servers, TestCgroup, Workload, kid, privileged, spiffe_client, standard_policy,
    validate_through, wait_published,
};

/// py-spiffe's `stream_jwt_bundles` on an agent: the kids of each bundle the stream sends.
struct BundleWatch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl BundleWatch {
    /// None: py-spiffe is not installed.
    fn start(agent: &Agent, cgroup: &Path) -> Option<BundleWatch> {
        let args = ["watch", "-", "test.tessera.dev", "1"];
        let mut child = spiffe_client(agent, cgroup, &args, "FetchJWTBundles")?;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Some(BundleWatch { child, lines })
    }

    /// The kids of the next bundle sent (panics after 30 s without one).
    fn next(&mut self) -> Vec<String> {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .expect("FetchJWTBundles sent nothing more in 30 s");
        let v: Value = serde_json::from_str(&line).expect("watch JSON");
        assert!(v.get("error").is_none(), "{v}");
        v["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k.as_str().expect("kid").to_owned())
            .collect()
    }
}

impl Drop for BundleWatch {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

#[test]
fn a_token_of_one_agent_validates_through_the_other() {
    if !privileged() {
        return;
    }
    let servers = Servers::start();
    let bundles = tempfile::tempdir().expect("bundle dir");
    let dir = bundles.path().to_str().expect("utf-8").to_owned();
    let (cg_a, cg_b) = (TestCgroup::new("bundle-a"), TestCgroup::new("bundle-b"));
    let mut agents = Vec::new();
    let mut apps = Vec::new();
    for cg in [&cg_a, &cg_b] {
        let (app, _) = cg.child("app");
        let _ = cg.child("other");
        agents.push(Agent::start(
            &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port, "enforce"),
            &cg.path,
            &["--trust-bundle-dir", &dir],
        ));
        apps.push(app);
    }
    let (a, b) = (&agents[0], &agents[1]);
    let files = std::fs::read_dir(bundles.path())
        .expect("bundle dir")
        .count();
    assert_eq!(files, 2, "one JWKS file per agent");

    let mut on_a = Workload::spawn(&apps[0], &a.api);
    let mut on_b = Workload::spawn(&apps[1], &b.api);
    let (status, body) = on_a.token("vault", Some(120));
    assert_eq!(status, 200, "{body}");
    let old = body["token"].as_str().expect("token").to_owned();
    wait_published(b, &mut on_b, &kid(&old));
    if let Some(v) = validate_through(b, &apps[1], &old) {
        assert_eq!(v["validated"], "spiffe://test.tessera.dev/app", "{v}");
    }

    // A rotates: B serves both of A's keys, so old and new tokens both validate through B, and
    // B's FetchJWTBundles stream sends the bundle again with A's new key.
    let mut watch = BundleWatch::start(b, &apps[1]);
    // The stream's first bundle, before the rotation.
    let first = watch.as_mut().map(BundleWatch::next);
    let admin = a.admin.to_str().expect("utf-8").to_owned();
    let (code, out, err) = a.cli(&["rotate-key", "--admin-socket", &admin]);
    assert_eq!(code, 0, "{out}{err}");
    let (status, body) = on_a.token("vault", Some(120));
    assert_eq!(status, 200, "{body}");
    let new = body["token"].as_str().expect("token").to_owned();
    assert_ne!(kid(&new), kid(&old));
    let jwks = wait_published(b, &mut on_b, &kid(&new));
    if let (Some(watch), Some(first)) = (watch.as_mut(), first) {
        assert!(first.contains(&kid(&old)), "{first:?}");
        assert!(!first.contains(&kid(&new)), "{first:?}");
        while !watch.next().contains(&kid(&new)) {}
    }
    assert!(
        jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["kid"] == kid(&old).as_str()),
        "the retired key left B's bundle: {jwks}"
    );
    for token in [&old, &new] {
        if let Some(v) = validate_through(b, &apps[1], token) {
            assert_eq!(v["validated"], "spiffe://test.tessera.dev/app", "{v}");
        }
    }
    // A's file leaves the directory: B keeps A's keys (published, verifying) until the last
    // token they could have signed expires, not a moment less.
    for entry in std::fs::read_dir(bundles.path())
        .expect("bundle dir")
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).expect("bundle file");
        if text.contains(&kid(&new)) {
            std::fs::remove_file(entry.path()).expect("remove A's file");
        }
    }
    b.wait_log("a trust bundle key left the source");
    let (_, jwks) = on_b.raw("GET", "/v1/jwks", None);
    for token in [&old, &new] {
        assert!(
            jwks["keys"]
                .as_array()
                .expect("keys")
                .iter()
                .any(|k| k["kid"] == kid(token).as_str()),
            "A's key left B's bundle with its file: {jwks}"
        );
        if let Some(v) = validate_through(b, &apps[1], token) {
            assert_eq!(v["validated"], "spiffe://test.tessera.dev/app", "{v}");
        }
    }

    // B's own tokens still validate through B, and not a forged one.
    let (status, body) = on_b.token("vault", Some(120));
    assert_eq!(status, 200, "{body}");
    let mine = body["token"].as_str().expect("token").to_owned();
    if let Some(v) = validate_through(b, &apps[1], &mine) {
        assert_eq!(v["validated"], "spiffe://test.tessera.dev/app", "{v}");
        // One character in the middle of the signature changed.
        let mut forged: Vec<char> = mine.chars().collect();
        let at = forged.len() - 20;
        forged[at] = if forged[at] == 'A' { 'B' } else { 'A' };
        let forged: String = forged.into_iter().collect();
        let v = validate_through(b, &apps[1], &forged).expect("py-spiffe");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("INVALID_ARGUMENT")),
            "{v}"
        );
    }
}
