//! Policy files: parse and validate any text; what validates must compile to kernel maps.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tessera_agent::policy::PolicySet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match PolicySet::from_str(Path::new("fuzz.yaml"), text) {
        Ok(policy) => {
            // A valid policy always compiles (the executable hashes are not read here).
            let _ = tessera_agent::kernel::compile(&policy, |_| Ok(1));
        }
        Err(errors) => {
            // Every error names its place and says what to do.
            let text = errors.to_string();
            assert!(!text.is_empty());
        }
    }
});
