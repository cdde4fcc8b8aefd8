//! Token server answers: no panic on any bytes, and a token that is taken is one that can be
//! sent (a sensitive `Bearer` header, no longer than the limit) for a lifetime in range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::upstream::{MAX_TOKEN_LEN, MAX_TOKEN_LIFETIME, parse_token_response};

fuzz_target!(|input: &[u8]| {
    if let Some((value, lifetime)) = parse_token_response(input) {
        assert!(value.is_sensitive());
        assert!(value.as_bytes().starts_with(b"Bearer "));
        assert!(value.len() <= "Bearer ".len() + MAX_TOKEN_LEN);
        assert!(lifetime <= MAX_TOKEN_LIFETIME, "{lifetime:?}");
    }
});
