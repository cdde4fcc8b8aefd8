//! Manifest JSON as pins and eviction walk it: no panic on any bytes, and every reference
//! found is a valid digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::oci::References;

fuzz_target!(|input: &[u8]| {
    if let Ok(refs) = References::of(input) {
        for digest in refs.blobs.iter().chain(refs.manifests.iter().map(|(d, _)| d)) {
            assert_eq!(digest.hex().len(), 64);
        }
    }
});
