//! Manifest media type files read back from disk: no panic on any bytes, and what is taken is
//! a valid `Content-Type` (a bad one once made every GET of its manifest panic).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::store::parse_media_type;

fuzz_target!(|input: &[u8]| {
    if let Some(media_type) = parse_media_type(input.to_vec()) {
        assert!(http::HeaderValue::from_str(&media_type).is_ok(), "{media_type:?}");
        assert!(media_type.contains('/'));
    }
});
