//! Tokens: any text is refused unless this key signed it; claims signed with the key verify
//! to the same claims when they are valid now, and a changed signature never verifies.
#![no_main]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tessera_agent::credential::Claims;
use tessera_agent::credential::fuzzing::TokenKeys;

const ISSUER: &str = "spiffe://fuzz.tessera.dev/tessera-agent";

fn keys() -> &'static TokenKeys {
    static KEYS: OnceLock<TokenKeys> = OnceLock::new();
    KEYS.get_or_init(|| TokenKeys::new(&std::env::temp_dir(), ISSUER).expect("signing key"))
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    let text = String::from_utf8_lossy(data);
    // As a token: whatever it is, nothing panics.
    let _ = keys.verify(&text, "vault");

    // As claims: sign them, verify them back.
    let Ok(mut claims) = serde_json::from_slice::<Claims>(data) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    claims.iss = ISSUER.to_owned();
    let token = keys.sign(&claims).expect("claims sign");
    // Well inside (or well outside) nbf..exp, whatever the 5 s leeway and the clock do.
    let valid = claims.nbf <= now && claims.exp > now.saturating_add(10);
    let invalid = claims.exp.saturating_add(10) < now || claims.nbf > now.saturating_add(10);
    match keys.verify(&token, &claims.aud) {
        Ok(back) => {
            assert!(!invalid, "verified outside nbf..exp: {claims:?}");
            assert_eq!(back, claims);
        }
        Err(e) => assert!(!valid, "valid claims refused ({e}): {claims:?}"),
    }
    // Another audience never verifies.
    let other = format!("{}-other", claims.aud);
    assert!(keys.verify(&token, &other).is_err());
    // A changed signature never verifies.
    let (signed, signature) = token.rsplit_once('.').expect("three parts");
    let mut flipped: Vec<u8> = signature.bytes().collect();
    if let Some(first) = flipped.first_mut() {
        *first = if *first == b'A' { b'B' } else { b'A' };
    }
    let forged = format!("{signed}.{}", String::from_utf8_lossy(&flipped));
    assert!(keys.verify(&forged, &claims.aud).is_err(), "forged: {forged}");
});
