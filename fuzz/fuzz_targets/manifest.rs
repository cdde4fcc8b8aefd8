//! Manifest JSON as pins and eviction walk it: no panic on any bytes, and every reference
//! found is a valid digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::oci::References;

fuzz_target!(|input: &[u8]| {
    if let Ok(refs) = References::of(input) {
        for descriptor in refs.blobs.iter().chain(&refs.manifests) {
            assert_eq!(descriptor.digest.hex().len(), 64);
        }
    }
});
