//! The registry helper (`support::registry`) and the image builders (`support::images`):
//! pushed images of every kind come back byte-exact, and the access log counts exactly what
//! pullcache's tests count with it.

use std::time::Duration;

use crate::support;
use crate::support::images::{self, PushedImage, sha256_digest};
use crate::support::registry::Registry;

const LOG_WAIT: Duration = Duration::from_secs(5);

async fn get_bytes(url: &str) -> (reqwest::StatusCode, Option<String>, bytes::Bytes) {
    let resp = support::http_client()
        .get(url)
        .header(
            "accept",
            [
                images::OCI_MANIFEST,
                images::OCI_INDEX,
                images::DOCKER_MANIFEST,
                images::DOCKER_MANIFEST_LIST,
            ]
            .join(", "),
        )
        .send()
        .await
        .expect("GET");
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    (status, ct, resp.bytes().await.expect("body"))
}

/// Every manifest and blob of `img` is served back byte-exact by the registry.
async fn assert_served(reg: &Registry, img: &PushedImage) {
    let base = format!("{}/v2/{}", reg.url(), img.name);
    let (status, ct, body) = get_bytes(&format!("{base}/manifests/{}", img.tag)).await;
    assert_eq!(status, 200);
    assert_eq!(ct.as_deref(), Some(img.manifest_media_type.as_str()));
    assert_eq!(body, img.manifest);
    for (digest, media_type) in &img.manifests {
        let (status, ct, body) = get_bytes(&format!("{base}/manifests/{digest}")).await;
        assert_eq!(status, 200, "manifest {digest}");
        assert_eq!(ct.as_deref(), Some(media_type.as_str()));
        assert_eq!(&sha256_digest(&body), digest);
    }
    for blob in &img.blobs {
        let (status, _, body) = get_bytes(&format!("{base}/blobs/{}", blob.digest)).await;
        assert_eq!(status, 200, "blob {}", blob.digest);
        assert_eq!(body.len() as u64, blob.size);
        assert_eq!(sha256_digest(&body), blob.digest);
    }
}

pub async fn push_all_kinds(reg: &Registry, big_layer: usize) -> [PushedImage; 3] {
    let oci = images::push_oci_image(&reg.url(), "smoke/oci", "v1", &[4096, big_layer])
        .await
        .expect("push oci image");
    let index = images::push_oci_index(&reg.url(), "smoke/index", "v1")
        .await
        .expect("push oci index");
    let docker = images::push_docker_image(&reg.url(), "library/dock", "v1", &[64 * 1024])
        .await
        .expect("push docker image");
    [oci, index, docker]
}

/// The path of `url` (`http://host/PATH`).
fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("/", |i| &rest[i..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_access_log_counts_exactly_and_restarts() {
    let mut reg = Registry::start().await.expect("registry starts");
    assert!(reg.url().starts_with("http://127.0.0.1:"));
    assert_ne!(reg.addr().port(), 0);

    let blob = images::random_bytes(100 * 1024);
    let digest = images::push_blob(&reg.url(), "smoke/blob", blob.clone())
        .await
        .expect("push blob");
    assert_eq!(digest, sha256_digest(&blob));
    let path = format!("/blobs/{digest}");
    let url = format!("{}/v2/smoke/blob{path}", reg.url());
    // Pushing did not produce GET/HEAD lines for the blob path.
    assert_eq!(reg.access_log_count("GET", &path), 0);
    assert_eq!(reg.access_log_count("HEAD", &path), 0);

    let client = support::http_client();
    for _ in 0..5 {
        let body = client.get(&url).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(body.as_ref(), blob.as_slice());
    }
    for _ in 0..2 {
        let resp = client.head(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    // A 404 and a query string: still one line each, matched on the path only.
    let missing = format!("/blobs/{}", sha256_digest(b"nope"));
    let resp = client
        .get(format!("{}/v2/smoke/blob{missing}?ns=example.com", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    assert_eq!(reg.wait_access_log_count("GET", &path, 5, LOG_WAIT).await, 5);
    assert_eq!(reg.wait_access_log_count("HEAD", &path, 2, LOG_WAIT).await, 2);
    assert_eq!(reg.wait_access_log_count("GET", &missing, 1, LOG_WAIT).await, 1);
    let entry = reg
        .access_log()
        .into_iter()
        .find(|e| e.path().ends_with(&missing))
        .expect("404 entry");
    assert_eq!(entry.status, 404);
    assert_eq!(entry.query(), Some("ns=example.com"));
    // Settling sees a request answered just before, and its own markers stay out of the log.
    let before = reg.access_log().len();
    let resp = client.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let since = reg.requests_since(before).await.expect("the registry settles");
    assert_eq!(since.len(), 1, "{since:?}");
    assert_eq!((since[0].method.as_str(), since[0].path()), ("HEAD", url_path(&url)));
    reg.settle().await.expect("the registry settles again");
    assert_eq!(
        reg.access_log().len(),
        before + 1,
        "a settle marker shows in the access log"
    );
    let raw = std::fs::read_to_string(reg.access_log_path()).unwrap();
    assert!(
        raw.contains("?pullcache-test-settle="),
        "no marker reached the registry"
    );
    // The app log mentions the same URIs but is a separate file: not counted.
    let app_log = std::fs::read_to_string(reg.app_log_path()).unwrap();
    assert!(app_log.contains(&digest));

    // stop: the port is closed; restart: same port, same storage.
    let addr = reg.addr();
    reg.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    reg.restart().await.expect("registry restarts");
    assert_eq!(reg.addr(), addr);
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(reg.wait_access_log_count("GET", &path, 6, LOG_WAIT).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_three_image_kinds() {
    let reg = Registry::start().await.expect("registry starts");
    let [oci, index, docker] = push_all_kinds(&reg, 2 * 1024 * 1024).await;

    assert_eq!(oci.manifest_media_type, images::OCI_MANIFEST);
    assert_eq!(oci.blobs.len(), 3);
    assert_eq!(oci.layers().len(), 2);
    assert!(oci.largest_blob().size >= 2 * 1024 * 1024);
    assert_eq!(index.manifest_media_type, images::OCI_INDEX);
    assert_eq!(index.manifests.len(), 3);
    assert_eq!(index.manifests.last().unwrap().0, index.manifest_digest);
    assert_eq!(index.blobs.len(), 4);
    assert_eq!(docker.manifest_media_type, images::DOCKER_MANIFEST);
    assert_eq!(docker.blobs[0].media_type, images::DOCKER_CONFIG);
    assert_eq!(docker.layers()[0].media_type, images::DOCKER_LAYER_GZIP);

    let idx: serde_json::Value = serde_json::from_slice(&index.manifest).unwrap();
    let archs: Vec<&str> = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, [images::host_arch(), images::other_arch()]);

    for img in [&oci, &index, &docker] {
        assert_served(&reg, img).await;
    }
}
