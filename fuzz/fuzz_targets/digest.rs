//! Digests: no panic, and only `sha256:<64 lowercase hex>` parses, printing back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::oci::Digest;

fuzz_target!(|input: &str| {
    if let Ok(digest) = input.parse::<Digest>() {
        assert_eq!(digest.to_string(), input);
        assert_eq!(digest.hex().len(), 64);
        assert!(
            digest
                .hex()
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }
});
