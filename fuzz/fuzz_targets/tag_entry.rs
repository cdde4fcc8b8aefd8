//! Tag index files read back from disk: no panic on any bytes, and an entry that is taken
//! has a media type that can be sent and is written back as it was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullcache::oci::is_valid_media_type;
use pullcache::store::{parse_tag_entry, tag_entry_file};

fuzz_target!(|input: &[u8]| {
    if let Some((key, record)) = parse_tag_entry(input) {
        assert!(is_valid_media_type(&record.media_type));
        assert!(http::HeaderValue::from_str(&record.media_type).is_ok());
        let again = parse_tag_entry(&tag_entry_file(&key, &record));
        assert_eq!(again, Some((key, record)));
    }
});
