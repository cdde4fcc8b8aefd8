//! Request targets as the server routes them: no panic (nor in deciding what intercept mode
//! passes through), and a routed name never holds a path traversal.
#![no_main]

use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use pullcache::oci::Registry;
use pullcache::server::routes::{self, Route};

fuzz_target!(|input: &str| {
    let Ok(uri) = input.parse::<Uri>() else {
        return;
    };
    let default = Registry::docker_hub();
    for method in [Method::GET, Method::HEAD, Method::PUT, Method::POST] {
        let route = routes::parse(&method, &uri, None, &default);
        let _ = routes::passes_through(&method, uri.path());
        if let Ok(Route::Manifest { target, .. } | Route::Blob { target, .. } | Route::Listing { target, .. }) = route {
            let name = target.repository.as_str();
            assert!(
                !name.contains("..") && !name.starts_with('/') && !name.contains('%'),
                "{name:?}"
            );
        }
    }
});
