//! OIDC discovery for federation: a real relying party (PyJWT's `PyJWKClient`, `pip install
//! pyjwt[crypto]`) finds the agent's keys through `<issuer>/.well-known/openid-configuration`
//! over HTTPS with a test CA (made with the openssl CLI), and verifies a token issued through
//! the Workload API; `tessera bundle export` writes the same documents; bad certificate files
//! stop the start with a clear error.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{
    Agent, Servers, TESSERA, TestCgroup, Workload, privileged, real_python, standard_policy,
};

/// PyJWT with its crypto extra is importable, installing it if needed; `Err` says why not.
fn pyjwt() -> Result<(), String> {
    support::python_package("import jwt, cryptography", "pyjwt[crypto]")
}

/// A test CA and server certificates it signed, made with the openssl CLI.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> TestPki {
        let pki = TestPki {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=tessera test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "subjectKeyIdentifier=hash",
        ]);
        std::fs::write(
            pki.path("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n",
        )
        .expect("extensions");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A server certificate with `serial` for 127.0.0.1: `<name>.pem` and `<name>.key`.
    fn server(&self, name: &str, serial: u32) -> (PathBuf, PathBuf) {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial.to_string(),
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            &pem,
        ]);
        (self.path(&pem), self.path(&key))
    }
}

/// A loopback port free now (the agent binds it next; the issuer URL names it).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Runs tests/oidc_client.py with `args`, `stdin` on its standard input; its JSON answer.
fn relying_party(args: &[&str], stdin: &str) -> Value {
    let mut child = Command::new(real_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc_client.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the PyJWT client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write the token");
    let out = child.wait_with_output().expect("PyJWT client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "PyJWT client {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("client said {stdout:?}: {e}"))
}

#[test]
fn pyjwt_discovers_the_keys_over_https_and_verifies_a_workload_token() {
    if !privileged() {
        return;
    }
    if let Err(why) = pyjwt() {
        tessera_agent::testkit::skip_offline(&why);
        return;
    }
    let pki = TestPki::new();
    let (cert, key) = pki.server("server", 1001);
    let port = free_port();
    let issuer = format!("https://127.0.0.1:{port}/tessera/test");
    let servers = Servers::start();
    let cg = TestCgroup::new("oidc");
    let (app, _) = cg.child("app");
    let _ = cg.child("other");
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port, "enforce"),
        &cg.path,
        &[
            "--issuer",
            &issuer,
            "--oidc-addr",
            &addr,
            "--oidc-cert",
            cert.to_str().expect("utf-8"),
            "--oidc-key",
            key.to_str().expect("utf-8"),
        ],
    );
    agent.wait_log("OIDC discovery listening");

    // A token through the Workload API, for the endpoint `vault`: its `iss` is the issuer.
    let mut w = Workload::spawn(&app, &agent.api);
    let (status, body) = w.token("vault", Some(120));
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().expect("token").to_owned();
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().expect("utf-8");
    let got = relying_party(&["discover", &issuer, ca, "vault"], &token);
    let config = &got["config"];
    assert_eq!(config["issuer"], issuer.as_str(), "{got}");
    assert_eq!(
        config["jwks_uri"],
        format!("{issuer}/.well-known/jwks.json").as_str()
    );
    assert_eq!(
        config["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert_eq!(
        config["response_types_supported"],
        serde_json::json!(["id_token"])
    );
    assert_eq!(
        config["subject_types_supported"],
        serde_json::json!(["public"])
    );
    let claims = &got["claims"];
    assert_eq!(claims["iss"], issuer.as_str(), "{got}");
    assert_eq!(claims["aud"], "vault");
    assert_eq!(claims["sub"], "spiffe://test.tessera.dev/app");
    let kid = jsonwebtoken::decode_header(&token)
        .expect("header")
        .kid
        .expect("kid");
    assert_eq!(got["kid"], kid.as_str());
    // What PyJWT refuses: another audience, another issuer, and the listener without the CA.
    assert_eq!(got["wrong_audience"], "InvalidAudienceError", "{got}");
    assert_eq!(got["wrong_issuer"], "InvalidIssuerError", "{got}");
    assert!(got["untrusted_ca"].is_string(), "{got}");
    // The listener serves the keys the Workload API does (the trust domain's union), marked
    // `use: sig` for OIDC relying parties (PyJWT takes no other key).
    let (_, jwks) = w.raw("GET", "/v1/jwks", None);
    let served: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid"))
        .collect();
    assert_eq!(got["keys"], serde_json::json!(served));

    // `tessera bundle export`: the same two documents, for a static host; PyJWT verifies the
    // token with the exported JWKS.
    let out = tempfile::tempdir().expect("export dir");
    let admin = agent.admin.to_str().expect("utf-8");
    let dir = out.path().to_str().expect("utf-8");
    let (code, stdout, stderr) = agent.cli(&["bundle", "export", dir, "--admin-socket", admin]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let read = |rel: &str| -> Value {
        serde_json::from_slice(&std::fs::read(out.path().join(rel)).expect(rel)).expect("JSON")
    };
    assert_eq!(read(".well-known/openid-configuration"), *config);
    let exported = read(".well-known/jwks.json");
    let kids: Vec<&str> = exported["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            assert_eq!(k["use"], "sig", "{exported}");
            k["kid"].as_str().expect("kid")
        })
        .collect();
    assert_eq!(kids, served);
    let jwks_file = out.path().join(".well-known/jwks.json");
    let from_file = relying_party(
        &["file", jwks_file.to_str().expect("utf-8"), &issuer, "vault"],
        &token,
    );
    assert_eq!(from_file["claims"]["jti"], claims["jti"], "{from_file}");

    // SIGHUP rereads the certificate: the listener presents the new one (serial 1002).
    assert_eq!(
        relying_party(&["serial", "127.0.0.1", &port.to_string(), ca], "")["serial"],
        "03E9"
    );
    let (new_cert, new_key) = pki.server("renewed", 1002);
    std::fs::copy(&new_key, &key).expect("new key");
    std::fs::copy(&new_cert, &cert).expect("new cert");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_log("OIDC listener certificate reloaded");
    assert_eq!(
        relying_party(&["serial", "127.0.0.1", &port.to_string(), ca], "")["serial"],
        "03EA"
    );
}

/// `tessera run` with `extra`, expected to refuse to start: its stderr.
fn refused_start(cg: &TestCgroup, policy: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy).expect("policy");
    let out = Command::new(TESSERA)
        .arg("run")
        .arg("--policy")
        .arg(&policy_file)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("--api-socket")
        .arg(dir.path().join("workload.sock"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .arg("--decision-log")
        .arg(dir.path().join("decisions.jsonl"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--metrics-addr", "off"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run tessera");
    // 1: refused at start; 2: a flag refused by the command line parser.
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "tessera run did not refuse: {out:?}"
    );
    assert!(
        !dir.path().join("workload.sock").exists(),
        "the Workload API was served"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_certificate_files_stop_the_start_with_what_to_fix() {
    if !privileged() {
        return;
    }
    let pki = TestPki::new();
    let (cert, key) = pki.server("server", 7);
    let (_, other_key) = pki.server("other", 8);
    let cg = TestCgroup::new("oidc-refused");
    let policy = standard_policy(&cg.rel, 1, 1, "enforce");
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("garbage");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let start = |cert: &str, key: &str| {
        refused_start(
            &cg,
            &policy,
            &[
                "--issuer",
                "https://oidc.example.org",
                "--oidc-addr",
                "127.0.0.1:0",
                "--oidc-cert",
                cert,
                "--oidc-key",
                key,
            ],
        )
    };
    let err = start("/nonexistent/oidc.pem", &path(&key));
    assert!(
        err.contains("--oidc-cert /nonexistent/oidc.pem: cannot read it"),
        "{err}"
    );
    let err = start(&path(&garbage), &path(&key));
    assert!(
        err.contains(&format!("--oidc-cert {}", path(&garbage))),
        "{err}"
    );
    let err = start(&path(&cert), &path(&garbage));
    assert!(
        err.contains(&format!("--oidc-key {}", path(&garbage))),
        "{err}"
    );
    let err = start(&path(&cert), &path(&other_key));
    assert!(err.contains("do not go together"), "{err}");
    // Settings that cannot serve discovery: no https issuer; plain HTTP off loopback.
    let err = refused_start(
        &cg,
        &policy,
        &["--oidc-addr", "127.0.0.1:0", "--oidc-plain-http"],
    );
    assert!(err.contains("--issuer"), "{err}");
    let err = refused_start(
        &cg,
        &policy,
        &[
            "--issuer",
            "https://oidc.example.org",
            "--oidc-addr",
            "0.0.0.0:0",
            "--oidc-plain-http",
        ],
    );
    assert!(err.contains("loopback"), "{err}");
    let err = refused_start(&cg, &policy, &["--issuer", "http://oidc.example.org"]);
    assert!(err.contains("is not an https:// URL"), "{err}");
}

#[test]
fn plain_http_on_loopback_serves_the_documents_for_a_tls_proxy() {
    if !privileged() {
        return;
    }
    let servers = Servers::start();
    let cg = TestCgroup::new("oidc-plain");
    let _ = cg.child("app");
    let _ = cg.child("other");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port, "enforce"),
        &cg.path,
        &[
            "--issuer",
            "https://oidc.example.org",
            "--oidc-addr",
            &addr,
            "--oidc-plain-http",
        ],
    );
    agent.wait_log("OIDC discovery listening");
    let get = |path: &str| -> (String, String) {
        use std::io::Read as _;
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: oidc.example.org\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
        (head.to_owned(), body.to_owned())
    };
    let (head, body) = get("/.well-known/openid-configuration");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("cache-control: public, max-age=60"),
        "{head}"
    );
    let doc: Value = serde_json::from_str(&body).expect("discovery JSON");
    assert_eq!(doc["issuer"], "https://oidc.example.org");
    assert_eq!(
        doc["jwks_uri"],
        "https://oidc.example.org/.well-known/jwks.json"
    );
    let (head, body) = get("/.well-known/jwks.json");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let jwks: Value = serde_json::from_str(&body).expect("JWKS JSON");
    assert_eq!(jwks["keys"][0]["use"], "sig", "{jwks}");
    assert_eq!(jwks["keys"][0]["alg"], "ES256", "{jwks}");
    let (head, body) = get("/v1/jwks");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(body.contains("/.well-known/openid-configuration"), "{body}");
}
