//! The daemon benchmark's summary on stdout (the JSON holds every sample).
use serde_json::Value;

use super::{BATCH, ENDPOINTS, ROUNDS};

pub fn print_report(r: &Value) {
    let c = &r["connect"];
    let s = &r["sustained"];
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let counted = r["ringbuf_wakeups_counted"] == true;
    let wakeups = |v: &Value| {
        if counted {
            format!("{v} (host-wide)")
        } else {
            "not counted".to_owned()
        }
    };
    println!("\nmachine: {}", r["machine"]);
    println!(
        "\nconnect+close, medians of {ROUNDS} alternating rounds of {BATCH}, {ENDPOINTS} endpoints:"
    );
    println!(
        "  detached {:.0}/s; protected (decided and logged) {:.0}/s, ratio {:.3}; unprotected ratio {:.3}; empty program ratio {:.3}",
        f(&c["rate_detached_per_s"]),
        f(&c["rate_protected_per_s"]),
        f(&c["ratio_protected_vs_detached"]),
        f(&c["ratio_unprotected_vs_detached"]),
        f(&c["ratio_floor_vs_detached"]),
    );
    println!(
        "  connect4 mean: protected {:.0} ns, unprotected {:.0} ns, empty program {:.0} ns",
        f(&c["connect4_protected_mean_ns"]),
        f(&c["connect4_unprotected_mean_ns"]),
        f(&c["empty_connect4_mean_ns"]),
    );
    println!(
        "  sock_create mean {:.0} ns, sock_release mean {:.0} ns (every socket under the attach point)",
        f(&c["sock_create_mean_ns"]),
        f(&c["sock_release_mean_ns"]),
    );
    println!(
        "  agent CPU per decision {:.2} µs ({} decisions); ring buffer wakeups {}",
        f(&c["agent_cpu_ns_per_decision"]) / 1e3,
        c["decisions"],
        wakeups(&c["ringbuf_wakeups_protected"]),
    );
    let k = &r["scaling"];
    println!("\nprotected path, mean run time by policy size (endpoint addresses, workloads):");
    for (program, key) in [
        ("connect4", "connect4_protected_mean_ns"),
        ("sendmsg4", "sendmsg4_protected_mean_ns"),
    ] {
        println!(
            "  {program}: 100k/10 {:.0} ns, 1k/10 {:.0} ns, 1k/10k {:.0} ns",
            f(&k[key]["endpoints_100k_workloads_10"]),
            f(&k[key]["endpoints_1k_workloads_10"]),
            f(&k[key]["endpoints_1k_workloads_10k"]),
        );
    }
    println!(
        "\nsustained: {:.0} datagrams/s for {:.1} s: {} sent, {} logged, {} dropped, {} log errors",
        f(&s["achieved_rate_per_s"]),
        f(&s["seconds"]),
        s["sent"],
        s["decisions_logged"],
        s["events_dropped"],
        s["decision_log_errors"],
    );
    println!(
        "  agent CPU per decision {:.2} µs; sendmsg4 mean {:.0} ns; ring buffer wakeups {}; agent RSS {} KiB at start, {} before, {} after",
        f(&s["agent_cpu_ns_per_decision"]) / 1e3,
        f(&s["sendmsg4_mean_ns"]),
        wakeups(&s["ringbuf_wakeups"]),
        s["rss_kib"]["start"],
        s["rss_kib"]["before"],
        s["rss_kib"]["after"],
    );
}
