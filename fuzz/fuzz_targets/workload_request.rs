//! The Workload API's first bytes: the head checks every request goes through, then the
//! credential request's body. A refusal is one of the statuses the API documents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_agent::credential::fuzzing::{RequestOutcome, workload_request};

fuzz_target!(|data: &[u8]| {
    match workload_request(data) {
        RequestOutcome::Partial => assert!(data.len() < 16 * 1024),
        RequestOutcome::Refused(status) => {
            assert!([400, 414, 431].contains(&status), "status {status}")
        }
        RequestOutcome::Head { body, .. } => {
            if let Ok(Some(task)) = body {
                assert!(!task.is_empty() && task.len() <= 256 && !task.contains(char::is_control));
            }
        }
    }
});
