//! The configuration file: any bytes give settings or located errors, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tessera_agent::config::FileConfig;

fuzz_target!(|data: &[u8]| {
    match FileConfig::from_bytes(Path::new("/etc/tessera/config.yaml"), data) {
        Ok(config) => assert_eq!(
            config.source.as_deref(),
            Some(Path::new("/etc/tessera/config.yaml"))
        ),
        Err(errors) => {
            for e in &errors.0 {
                assert!(
                    e.to_string().starts_with("/etc/tessera/config.yaml:"),
                    "{e}"
                );
            }
        }
    }
});
