//! Request targets as the server routes them: no panic, and a routed name never holds a path
//! traversal.
#![no_main]

use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use pullcache::server::routes::{self, Route};

fuzz_target!(|input: &str| {
    let Ok(uri) = input.parse::<Uri>() else {
        return;
    };
    for method in [Method::GET, Method::HEAD, Method::PUT] {
        if let Ok(Route::Manifest { target, .. } | Route::Blob { target, .. }) = routes::parse(&method, &uri, None) {
            let name = target.repository.as_str();
            assert!(
                !name.contains("..") && !name.starts_with('/') && !name.contains('%'),
                "{name:?}"
            );
        }
    }
});
