//! Image references and repository names: no panic, and what parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::oci::{ImageRef, Repository};

fuzz_target!(|input: &str| {
    if let Ok(image) = ImageRef::parse(input) {
        let printed = image.to_string();
        let again = ImageRef::parse(&printed).expect("a printed reference parses");
        assert_eq!(again, image, "{input:?} -> {printed:?}");
    }
    if let Ok(name) = Repository::parse(input) {
        let s = name.as_str();
        assert_eq!(s, input);
        assert!(!s.starts_with('/') && !s.contains("..") && !s.contains("//"), "{s:?}");
    }
});
