//! The kernel's events as the agent reads them off the ring buffers: any bytes decode to an
//! event or to nothing, and every decision event becomes a record that serialises.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tessera_agent::decision::{Enricher, NoCredentials};
use tessera_agent::kernel::{decode_decision_event, decode_process_event};
use tessera_agent::policy::PolicySet;

const POLICY: &str = include_str!("../../policies/example.yaml");

fn enricher() -> &'static Enricher {
    static ENRICHER: OnceLock<Enricher> = OnceLock::new();
    ENRICHER.get_or_init(|| {
        let policy = PolicySet::from_str(Path::new("example.yaml"), POLICY).expect("policy");
        Enricher::new(
            Arc::new(policy),
            Arc::new(NoCredentials),
            PathBuf::from("/nonexistent/tessera-fuzz-cgroup"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = decode_process_event(data);
    let Some(mut ev) = decode_decision_event(data) else {
        assert!(data.len() < size_of::<tessera_common::DecisionEvent>());
        return;
    };
    // No process of this host: the record comes from the event alone.
    ev.pid = u32::MAX - 7;
    ev.tgid = u32::MAX - 7;
    let record = enricher().enrich(&ev);
    let json = serde_json::to_string(&record).expect("record serialises");
    assert!(json.starts_with('{'));
});
