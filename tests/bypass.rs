//! The bypass suite: every attempt of `tessera selftest`, each as a privileged test in a cgroup
//! of its own with its own agent, through the same library code as the CLI (so they cannot
//! drift), asserting the syscall's result AND the decision record's verdict, reason and hook.
//! Attempts that are known ways through (gaps, docs/bypass-catalog.md) assert that they still
//! behave as documented. Plus `tessera selftest` end to end.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use serde_json::Value;
use support::{TESSERA, privileged};
use tessera_agent::selftest::{Attempt, AttemptResult, Harness, HarnessConfig, Outcome, Status};

fn run(attempt: Attempt) -> Option<AttemptResult> {
    if !privileged() {
        return None;
    }
    let harness = Harness::start(HarnessConfig {
        exe: TESSERA.into(),
        cgroup_name: format!("tessera-test-{}-bypass-{}", std::process::id(), attempt),
        interrupted: None,
    })
    .unwrap_or_else(|e| panic!("{attempt}: cannot set up: {e}"));
    let result = harness
        .run(attempt)
        .unwrap_or_else(|e| panic!("{attempt}: {e}"));
    if result.status == Status::Skipped {
        tessera_agent::testkit::skip(&format!(
            "{attempt}: {}",
            result.note.clone().unwrap_or_default()
        ));
        return None;
    }
    Some(result)
}

/// The attempt observed exactly what the catalog expects: the syscall's result and a record
/// with the expected verdict, reason and hook from the process that made the call.
fn assert_as_expected(attempt: Attempt) {
    let Some(r) = run(attempt) else {
        return;
    };
    let dump = serde_json::to_string_pretty(&r).expect("json");
    let observed = r.observed.as_ref().expect("observed");
    let expected = attempt.expected();
    assert_eq!(
        observed.result,
        expected.result.as_observed(),
        "{attempt}: wrong result\n{dump}"
    );
    if let Some(e) = expected.record {
        let rec: &Value = observed
            .record
            .as_ref()
            .unwrap_or_else(|| panic!("{attempt}: no decision record\n{dump}"));
        assert_eq!(rec["verdict"], e.verdict, "{attempt}\n{dump}");
        assert_eq!(rec["reason"], e.reason, "{attempt}\n{dump}");
        assert_eq!(rec["hook"], e.hook, "{attempt}\n{dump}");
        assert_eq!(rec["process"]["tgid"], observed.tgid, "{attempt}\n{dump}");
        if e.verdict == "deny" {
            assert_eq!(rec["enforced"], true, "{attempt}\n{dump}");
        }
    }
    if let Outcome::Refused(how) = expected.result {
        // The hooks refuse with EPERM; a packet socket is refused by killing the asker; an
        // open connection is ended by the agent (a TCP abort, a UDP disconnect).
        let want = match attempt {
            Attempt::PacketSocket => "SIGKILL",
            Attempt::RevokeOpenConnection => "ECONNABORTED",
            Attempt::RevokeConnectedUdp => "EDESTADDRREQ",
            _ => "EPERM",
        };
        assert_eq!(how, want, "{attempt}");
    }
    let want = if expected.gap.is_some() {
        Status::Gap
    } else {
        Status::Pass
    };
    assert_eq!(r.status, want, "{attempt}\n{dump}");
}

macro_rules! attempts {
    ($($test:ident => $attempt:ident,)*) => {
        $(
            #[test]
            fn $test() {
                assert_as_expected(Attempt::$attempt);
            }
        )*

        /// Every attempt of the catalog has a test here.
        #[test]
        fn every_attempt_has_a_test() {
            let tested = [$(Attempt::$attempt),*];
            for a in Attempt::ALL {
                assert!(tested.contains(&a), "{a} has no test in tests/bypass.rs");
            }
        }
    };
}

attempts! {
    tcp_connect4_is_refused => TcpConnect4,
    tcp_connect6_is_refused => TcpConnect6,
    tcp_connect_v4_mapped_is_refused => TcpConnectV4Mapped,
    nonblocking_connect_is_refused_at_connect => TcpConnectNonblocking,
    fastopen_sendto_is_refused => TcpFastopenSendto,
    fastopen_sendmsg_is_refused => TcpFastopenSendmsg,
    fastopen_connect_option_is_refused => TcpFastopenConnect,
    udp_connect4_is_refused => UdpConnect4,
    udp_connect6_is_refused => UdpConnect6,
    udp_sendto4_is_refused => UdpSendto4,
    udp_sendto6_is_refused => UdpSendto6,
    udp_sendmsg4_is_refused => UdpSendmsg4,
    udp_sendmsg6_is_refused => UdpSendmsg6,
    udp_sendmmsg4_is_refused => UdpSendmmsg4,
    udp_sendmmsg6_is_refused => UdpSendmmsg6,
    io_uring_connect4_is_refused => UringConnect4,
    io_uring_connect6_is_refused => UringConnect6,
    io_uring_sendmsg4_is_refused => UringSendmsg4,
    io_uring_sendmsg6_is_refused => UringSendmsg6,
    a_socket_passed_to_a_stranger_is_refused => ScmRightsToStranger,
    a_strangers_socket_used_by_the_holder_is_allowed => ScmRightsFromStranger,
    an_open_connection_passed_on_gets_through_as_documented => ScmRightsConnectedSocket,
    fork_child_of_a_bind_process_holder_is_refused => ForkBindProcess,
    fork_child_of_a_bind_workload_holder_is_allowed => ForkBindWorkload,
    exec_ends_a_bind_process_grant => ExecAfterGrant,
    setuid_to_another_user_is_refused => SetuidAfterGrant,
    moving_to_another_workloads_cgroup_is_refused => CgroupMoveOtherWorkload,
    moving_to_a_cgroup_of_no_workload_is_refused => CgroupMoveNoWorkload,
    moving_out_of_the_enforced_subtree_gets_through_as_documented => CgroupMoveOutside,
    a_new_network_namespace_is_refused => NetnsVeth,
    revocation_ends_an_open_connection => RevokeOpenConnection,
    revocation_ends_a_connected_udp_socket => RevokeConnectedUdp,
    raw_ipv4_socket_is_refused => RawSocket4,
    raw_ipv6_socket_is_refused => RawSocket6,
    packet_socket_kills_the_asker => PacketSocket,
    ipv4_compatible_ipv6_is_refused => TcpConnectV4Compat,
    egress_allowlist_refuses_an_unlisted_tcp_destination => EgressUnlistedTcp,
    egress_allowlist_refuses_an_unlisted_udp_destination => EgressUnlistedUdp,
    raw_udp_from_an_unrestricted_process_gets_through_as_documented => RawUdpUnrestricted,
    a_resolved_hostname_address_is_refused => HostnameEndpoint,
    the_unspecified_ipv4_address_is_refused => TcpConnectUnspecified4,
    the_unspecified_ipv6_address_is_refused => TcpConnectUnspecified6,
    the_mapped_unspecified_address_is_refused => TcpConnectUnspecifiedMapped,
    another_loopback_address_is_refused => TcpConnectLoopbackAlias,
    the_hosts_own_address_is_refused => TcpConnectHostAddress,
}

#[test]
fn selftest_end_to_end() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("selftest.json");
    let child = std::process::Command::new(TESSERA)
        .args(["selftest", "--keep-going", "--json"])
        .arg(&json_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tessera selftest");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for tessera selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tessera selftest failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("attempt") && stdout.contains(" 0 failed"),
        "{stdout}"
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("json written")).expect("json");
    assert_eq!(report["schema"], "tessera.selftest/v1");
    assert_eq!(report["failed"], 0);
    assert_eq!(report["not_run"], 0);
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), Attempt::ALL.len());
    for r in results {
        let status = r["status"].as_str().expect("status");
        assert!(
            ["pass", "gap", "skipped"].contains(&status),
            "{}: {status}\n{r:#}",
            r["attempt"]
        );
        if status != "skipped" {
            assert_eq!(r["observed"]["result"], r["expected"]["result"], "{r:#}");
        }
    }
    // Every gap is named in the catalog document.
    let catalog = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bypass-catalog.md"),
    )
    .expect("docs/bypass-catalog.md");
    for a in Attempt::ALL {
        assert!(
            catalog.contains(&format!("`{a}`")),
            "docs/bypass-catalog.md does not describe `{a}`"
        );
    }
    // Its scratch cgroups are gone.
    let root = support::cgroup2_root();
    for dir in [
        format!("tessera-selftest-{pid}"),
        format!("tessera-selftest-{pid}-outside"),
    ] {
        assert!(!root.join(&dir).exists(), "{dir} was left behind");
    }
}
