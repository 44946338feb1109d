//! Privileged smoke test of the kernel programs and their loader: a real kernel, a cgroup made
//! for the test, loopback listeners, and a child process that connects from inside the cgroup.
//!
//! Run: `cargo test -p tessera-agent --test kernel_smoke -- --nocapture --test-threads=1`.
//! Skips (with a message) unless run as root.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: a panic with context is its failure report"
)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tessera_agent::identity::spiffe::SpiffeId;
use tessera_agent::kernel::{Enforcer, SyncReport};
use tessera_agent::kernel::{
    EventReader, GrantMaps, SyncWarning, boot_time_ns, cgroup_id, cgroup2_root,
};
use tessera_agent::policy::{
    Bind, CredentialPolicy, Egress, Endpoint, EndpointId, EndpointKind, Mode, PolicySet, Protocol,
    Rule, Workload, WorkloadId,
};
use tessera_common::{
    DecisionEvent, GRANT_ACTIVE, GrantSlot, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4,
    MODE_OVERRIDE_AUDIT, MODE_OVERRIDE_NONE, NONE_ID, REASON_ALLOWLISTED,
    REASON_CREDENTIAL_EXPIRED, REASON_CREDENTIAL_REVOKED, REASON_CREDENTIAL_VALID,
    REASON_NO_CREDENTIAL, REASON_UNKNOWN_WORKLOAD, REASON_WORKLOAD_NOT_ALLOWED, VERDICT_ALLOW,
    VERDICT_DENY, WorkloadGrantKey,
};

const EPERM: i32 = 1;

/// A cgroup under the cgroup v2 root, made for this test and removed on drop (its processes are
/// moved back to the root first).
struct TestCgroup {
    root: PathBuf,
    path: PathBuf,
}

impl TestCgroup {
    fn create(root: &Path, name: &str) -> TestCgroup {
        let path = root.join(name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup {
            root: root.to_path_buf(),
            path,
        }
    }

    /// Path relative to the cgroup v2 root, as policies write it.
    fn policy_path(&self) -> String {
        format!("/{}", self.path.strip_prefix(&self.root).unwrap().display())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("removing cgroup {}: {e}", self.path.display());
        }
    }
}

/// A python process inside a cgroup that connects where it is told; killed on drop.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

const CLIENT: &str = r#"
import socket, sys
print("ready", flush=True)
for line in sys.stdin:
    kind, host, port = line.split()
    family = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
    udp = kind.startswith("udp")
    s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        if udp:
            s.sendto(b"x", (host, int(port)))
        else:
            s.connect((host, int(port)))
        print("ok", flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
    finally:
        s.close()
"#;

impl Client {
    fn spawn(python: &str, cgroup: &Path) -> Client {
        // The shell joins the cgroup, then execs python: same pid, so every socket the client
        // makes is created and connected inside the cgroup.
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec '{python}' -c \"$0\"",
            cgroup.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script, CLIENT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning the client");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the client did not start");
        Client {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Ok(())` or `Err(errno)`.
    fn try_connect(&mut self, kind: &str, host: &str, port: u16) -> Result<(), i32> {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{kind} {host} {port}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ok"] => Ok(()),
            ["err", errno] => Err(errno.parse().unwrap()),
            other => panic!("unexpected client answer {other:?}"),
        }
    }

    /// Closes the client's stdin and waits for it to exit.
    fn exit(mut self) {
        drop(self.stdin.take());
        self.child.wait().unwrap();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The decision events of the test, read with a timeout.
struct Events {
    runtime: tokio::runtime::Runtime,
    reader: EventReader,
}

impl Events {
    fn next(&mut self) -> DecisionEvent {
        let reader = &mut self.reader;
        self.runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), reader.next()).await })
            .expect("no decision event within 2 s")
            .expect("the event reader ended")
    }

    fn assert_none(&mut self) {
        assert_eq!(self.reader.try_next(), None, "an unexpected decision event");
    }
}

fn spiffe(path: &str) -> SpiffeId {
    format!("spiffe://test.tessera.dev/{path}").parse().unwrap()
}

fn workload(name: &str, cgroup: &str) -> Workload {
    Workload {
        name: name.to_owned(),
        spiffe_id: spiffe(name),
        selectors: tessera_agent::identity::selectors::Selectors {
            cgroup: Some(cgroup.to_owned()),
            ..Default::default()
        },
        egress: Egress::Open,
        mode: Mode::Enforce,
    }
}

fn endpoint(name: &str, addresses: &[&str], ports: Vec<u16>, protocol: Protocol) -> Endpoint {
    Endpoint {
        name: name.to_owned(),
        kind: EndpointKind::SecretStore,
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        hosts: Vec::new(),
        audiences: Vec::new(),
        ports,
        protocol,
        mode: Mode::Enforce,
        labels: Default::default(),
    }
}

fn rule(name: &str, endpoints: Vec<u32>, credential: bool, mode: Mode) -> Rule {
    Rule {
        name: name.to_owned(),
        workloads: vec![WorkloadId(0)],
        endpoints: endpoints.into_iter().map(EndpointId).collect(),
        credential: credential.then_some(CredentialPolicy {
            max_ttl: Duration::from_secs(300),
            bind: Bind::Process,
            keep_on_exec: false,
            connections: Default::default(),
        }),
        mode,
        scopes: Vec::new(),
        issuance: None,
        token_match: None,
    }
}

fn policy(workloads: Vec<Workload>, endpoints: Vec<Endpoint>, rules: Vec<Rule>) -> PolicySet {
    PolicySet {
        revision: "sha256:test".to_owned(),
        workloads,
        endpoints,
        rules,
        sources: Vec::new(),
        issuance: Vec::new(),
        trusted_issuers: Vec::new(),
    }
}

fn grant(credential_id: u64, endpoint_id: u32, expires_at_ns: u64) -> GrantSlot {
    GrantSlot {
        expires_at_ns,
        credential_id,
        endpoint_id,
        workload_id: 0,
        state: GRANT_ACTIVE,
        flags: 0,
    }
}

#[track_caller]
fn assert_event(ev: &DecisionEvent, client: &Client, reason: u8, verdict: u8, enforced: bool) {
    assert_eq!(ev.reason, reason, "reason of {ev:?}");
    assert_eq!(ev.verdict, verdict, "verdict of {ev:?}");
    assert_eq!(ev.enforced, u8::from(enforced), "enforced of {ev:?}");
    assert_eq!(ev.tgid, client.pid(), "tgid of {ev:?}");
    assert_eq!(ev.pid, client.pid(), "pid of {ev:?}");
}

fn python() -> Option<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn sync(enforcer: &Enforcer, policy: &PolicySet, root: &Path) -> SyncReport {
    let report = enforcer.sync_policy(policy, root).expect("sync_policy");
    println!("sync: {report:?}");
    report
}

static CGROUP_SEQ: AtomicU32 = AtomicU32::new(0);

#[test]
fn kernel_decisions_on_a_test_cgroup() {
    if !nix::unistd::Uid::effective().is_root() {
        tessera_agent::testkit::skip("loading eBPF programs and creating cgroups needs root");
        return;
    }
    let Some(python) = python() else {
        tessera_agent::testkit::skip("the client needs python3");
        return;
    };
    let root = cgroup2_root().expect("cgroup v2 root");
    let name = format!(
        "tessera-test-{}-{}",
        std::process::id(),
        CGROUP_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let cgroup = TestCgroup::create(&root, &name);
    // The client runs one level below the workload's cgroup: the kernel walks the ancestors.
    let leaf = TestCgroup::create(&cgroup.path, "leaf");
    // A sibling, where a workload's cgroup is missing.
    let other = TestCgroup::create(&cgroup.path, "other");
    assert_eq!(
        cgroup_id(&leaf.path).unwrap(),
        cgroup_id(&root.join(&name).join("leaf")).unwrap()
    );

    let mut enforcer = Enforcer::load().unwrap_or_else(|e| panic!("load: {}", chain(&e)));
    enforcer
        .attach(&cgroup.path)
        .unwrap_or_else(|e| panic!("attach: {}", chain(&e)));
    let grants: GrantMaps = enforcer.grants();
    let mut events = Events {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        reader: enforcer.events().unwrap(),
    };

    let vault = TcpListener::bind("127.0.0.1:0").unwrap();
    let vault_port = vault.local_addr().unwrap().port();
    let open = TcpListener::bind("127.0.0.1:0").unwrap();
    let open_port = open.local_addr().unwrap().port();
    let vault6 = TcpListener::bind("[::1]:0").ok();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();

    let endpoints = || {
        vec![
            endpoint(
                "vault",
                &["127.0.0.1/32", "::1/128"],
                vec![vault_port],
                Protocol::Tcp,
            ),
            endpoint("udp-any-port", &["127.0.0.0/8"], vec![], Protocol::Udp),
        ]
    };

    let mut client = Client::spawn(&python, &leaf.path);
    let pid = client.pid();
    println!("client pid {pid} in {}", leaf.path.display());

    // 1. Protected endpoint, no workload at all.
    let report = sync(&enforcer, &policy(vec![], endpoints(), vec![]), &root);
    // Both endpoints are local: `vault` is also 127.0.0.0/8 on its port (one more LPM entry),
    // `udp-any-port` also ::1 (one more exact entry); this enforcer knows no host addresses.
    assert_eq!(report.exact_endpoints, 3);
    assert_eq!(report.cidr_endpoints, 2);
    assert_eq!(client.try_connect("tcp4", "127.0.0.1", open_port), Ok(()));
    events.assert_none();
    assert_eq!(
        client.try_connect("tcp4", "127.0.0.1", vault_port),
        Err(EPERM)
    );
    let ev = events.next();
    assert_event(&ev, &client, REASON_UNKNOWN_WORKLOAD, VERDICT_DENY, true);
    assert_eq!(ev.workload_id, NONE_ID);
    assert_eq!(ev.hook, HOOK_CONNECT4);
    assert_eq!(ev.port, vault_port);
    assert_eq!(ev.family, 4);
    assert_eq!(ev.creator_tgid, pid);
    assert_eq!(ev.cgroup_id, cgroup_id(&leaf.path).unwrap());
    assert_eq!(ev.policy_generation, report.generation);
    assert_eq!(&ev.addr[10..], &[0xff, 0xff, 127, 0, 0, 1]);

    // 2. A workload, but no rule for it.
    let agent = workload("agent", &cgroup.policy_path());
    let missing_path = format!("{}/other/no-such-cgroup", cgroup.policy_path());
    let missing = workload("missing", &missing_path);
    let report = sync(
        &enforcer,
        &policy(vec![agent.clone(), missing], endpoints(), vec![]),
        &root,
    );
    assert!(matches!(
        report.warnings.as_slice(),
        [SyncWarning::MissingCgroup { workload, .. }] if workload == "missing"
    ));
    assert_eq!(
        client.try_connect("tcp4", "127.0.0.1", vault_port),
        Err(EPERM)
    );
    let ev = events.next();
    assert_event(
        &ev,
        &client,
        REASON_WORKLOAD_NOT_ALLOWED,
        VERDICT_DENY,
        true,
    );
    assert_eq!(ev.workload_id, 0);

    // 3. Rule requiring a credential, none held.
    let with_credential = policy(
        vec![agent.clone()],
        endpoints(),
        vec![rule("agent-to-vault", vec![0], true, Mode::Enforce)],
    );
    let report = sync(&enforcer, &with_credential, &root);
    assert_eq!((report.workloads, report.rules, report.removed), (1, 1, 0));
    assert_eq!(
        client.try_connect("tcp4", "127.0.0.1", vault_port),
        Err(EPERM)
    );
    let ev = events.next();
    assert_event(&ev, &client, REASON_NO_CREDENTIAL, VERDICT_DENY, true);
    assert_eq!(ev.rule_id, 0);

    // 4. A grant for the client's process: allowed, over IPv4, IPv6 and IPv4-mapped IPv6.
    // Written for another task with the client's pid (another instance marker), it does not
    // apply; written for the client's own marker, it does.
    let now = boot_time_ns();
    let owner = enforcer.identities().instance(pid).unwrap();
    assert_ne!(owner, 0);
    assert_eq!(
        enforcer.identities().instance(pid).unwrap(),
        owner,
        "stable"
    );
    grants
        .put_process_grant(pid, owner + 1, grant(42, 0, now + 60_000_000_000))
        .unwrap();
    assert_eq!(
        client.try_connect("tcp4", "127.0.0.1", vault_port),
        Err(EPERM),
        "a grant written for another instance of the pid applied"
    );
    let ev = events.next();
    assert_event(&ev, &client, REASON_NO_CREDENTIAL, VERDICT_DENY, true);
    grants
        .put_process_grant(pid, owner, grant(42, 0, now + 60_000_000_000))
        .unwrap();
    assert_eq!(grants.active_count(boot_time_ns()), 1);
    assert_eq!(client.try_connect("tcp4", "127.0.0.1", vault_port), Ok(()));
    let ev = events.next();
    assert_event(&ev, &client, REASON_CREDENTIAL_VALID, VERDICT_ALLOW, false);
    assert_eq!(ev.credential_id, 42);
    assert_eq!(
        client.try_connect("tcp6", "::ffff:127.0.0.1", vault_port),
        Ok(())
    );
    let ev = events.next();
    assert_event(&ev, &client, REASON_CREDENTIAL_VALID, VERDICT_ALLOW, false);
    assert_eq!((ev.hook, ev.family), (HOOK_CONNECT6, 4));
    if let Some(vault6) = &vault6 {
        let port6 = vault6.local_addr().unwrap().port();
        // ::1 on another port than the endpoint's: unprotected.
        assert_eq!(client.try_connect("tcp6", "::1", port6), Ok(()));
        events.assert_none();
    }

    // 5. Revoked, then expired.
    assert!(grants.revoke_process_grant(pid, 42).unwrap());
    assert_eq!(
        client.try_connect("tcp4", "127.0.0.1", vault_port),
        Err(EPERM)
    );
    assert_event(
        &events.next(),
        &client,
        REASON_CREDENTIAL_REVOKED,
        VERDICT_DENY,
        true,
    );
    grants
        .put_process_grant(pid, owner, grant(43, 0, boot_time_ns() - 1))
        .unwrap();
    assert_eq!(
        client.try_connect("tcp4", "127.0.0.1", vault_port),
        Err(EPERM)
    );
    let ev = events.next();
    assert_event(&ev, &client, REASON_CREDENTIAL_EXPIRED, VERDICT_DENY, true);
    assert_eq!(ev.credential_id, 43);

    // 6. A workload grant also opens the way.
    let key = WorkloadGrantKey {
        workload_id: 0,
        endpoint_id: 0,
    };
    grants
        .put_workload_grant(key, grant(44, 0, boot_time_ns() + 60_000_000_000))
        .unwrap();
    assert_eq!(client.try_connect("tcp4", "127.0.0.1", vault_port), Ok(()));
    let ev = events.next();
    assert_event(&ev, &client, REASON_CREDENTIAL_VALID, VERDICT_ALLOW, false);
    assert_eq!(ev.credential_id, 44);
    assert!(grants.revoke_workload_grant(key, 44).unwrap());

    // 7. Audit override: the deny is logged, not enforced.
    enforcer.set_mode_override(MODE_OVERRIDE_AUDIT).unwrap();
    assert_eq!(client.try_connect("tcp4", "127.0.0.1", vault_port), Ok(()));
    assert_event(
        &events.next(),
        &client,
        REASON_CREDENTIAL_REVOKED,
        VERDICT_DENY,
        false,
    );
    enforcer.set_mode_override(MODE_OVERRIDE_NONE).unwrap();

    // 8. UDP through a CIDR endpoint with every port, first denied, then allowlisted.
    assert_eq!(
        client.try_connect("udp4", "127.0.0.1", udp_port),
        Err(EPERM)
    );
    let ev = events.next();
    assert_event(
        &ev,
        &client,
        REASON_WORKLOAD_NOT_ALLOWED,
        VERDICT_DENY,
        true,
    );
    assert_eq!((ev.hook, ev.endpoint_id), (HOOK_SENDMSG4, 1));
    let allowlisted = policy(
        vec![agent.clone()],
        endpoints(),
        vec![
            rule("agent-to-vault", vec![0], true, Mode::Enforce),
            rule("agent-udp", vec![1], false, Mode::Enforce),
        ],
    );
    sync(&enforcer, &allowlisted, &root);
    assert_eq!(client.try_connect("udp4", "127.0.0.1", udp_port), Ok(()));
    assert_event(
        &events.next(),
        &client,
        REASON_ALLOWLISTED,
        VERDICT_ALLOW,
        false,
    );

    // 9. The process exits: its grants go with it, in the kernel.
    grants
        .put_process_grant(pid, owner, grant(45, 0, boot_time_ns() + 60_000_000_000))
        .unwrap();
    client.exit();
    let slots = grants.process_grants(pid).unwrap();
    assert!(
        slots.slots.iter().all(|s| s.credential_id == 0),
        "grants of exited process {pid} remain: {slots:?}"
    );
    // Its instance marker went too: whoever gets the pid next gets another one.
    let next = enforcer.identities().instance(pid).unwrap();
    assert!(next > owner, "pid {pid}: marker {next} after {owner}");

    // 10. A sync to an empty policy removes everything; nothing is protected any more.
    let report = sync(&enforcer, &policy(vec![], vec![], vec![]), &root);
    assert!(report.removed >= 5);
    let mut client = Client::spawn(&python, &leaf.path);
    assert_eq!(client.try_connect("tcp4", "127.0.0.1", vault_port), Ok(()));
    events.assert_none();
    assert_eq!(enforcer.dropped_events().unwrap(), 0);
    let stats = enforcer.program_stats().unwrap();
    // Every program of the object is loaded, the packet-drop pair too (attached only when
    // that is the connection-ending mechanism).
    assert_eq!(stats.len(), 12, "{stats:?}");
    drop(client);

    enforcer.detach().unwrap();
    drop(enforcer);
    drop(leaf);
    drop(other);
    drop(cgroup);
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
