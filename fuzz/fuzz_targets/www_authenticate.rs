//! `WWW-Authenticate` challenges from upstreams: no panic, and a parsed Bearer challenge has a
//! realm that came from the header (verbatim when nothing in it was escaped).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::upstream::Challenge;

fuzz_target!(|input: &str| {
    if let Some(challenge) = Challenge::parse(input) {
        if !input.contains('\\') {
            assert!(
                input.contains(challenge.realm.as_str()),
                "{input:?} gave realm {:?}",
                challenge.realm
            );
        }
        let _ = challenge.scope_for(None);
    }
});
