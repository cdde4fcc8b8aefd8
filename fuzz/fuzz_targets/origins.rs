//! Provenance records read back from disk: no panic on any bytes, and a record that is taken
//! holds at most the limit of private origins, none of them "public".
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::oci::{MAX_PRIVATE_ORIGINS, Visibility};
use pullcache::store::parse_origins;

fuzz_target!(|input: &[u8]| {
    if let Ok(provenance) = parse_origins(input) {
        assert!(provenance.private.len() <= MAX_PRIVATE_ORIGINS);
        assert!(provenance.private.iter().all(|(_, v)| *v != Visibility::Public));
    }
});
