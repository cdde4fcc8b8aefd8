//! The pins file read back from disk: no panic on any text, and every pin taken names an
//! image by a valid reference that prints back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::oci::ImageRef;
use pullcache::store::parse_pins;

fuzz_target!(|input: &str| {
    for pin in parse_pins(input) {
        assert_eq!(ImageRef::parse(&pin.to_string()).ok(), Some(pin));
    }
});
