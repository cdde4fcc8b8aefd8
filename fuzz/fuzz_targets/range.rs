//! `Range` headers against a blob size: no panic, and every range served lies inside the blob.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::server::range;

fuzz_target!(|input: (u64, &str)| {
    let (size, header) = input;
    if let Ok(Some((first, last))) = range::parse(Some(header), size) {
        assert!(
            first <= last && last < size,
            "{header:?} on {size} bytes gave {first}-{last}"
        );
    }
});
