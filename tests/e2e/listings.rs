//! Tag lists and the referrers API pass through pullcache, with the real registry upstream:
//! paged as the registry pages them (`n`, `last`, `Link`), kept within the tag TTL, and
//! authorized as the content they describe (a private repository's list only for a client
//! the registry accepts, and never through mirror mode's `bypass`). A registry without the
//! referrers API gets the spec's 404, and the fallback tag (`sha256-<hex>`) keeps working; a
//! fake registry that has the API shows referrers relayed and filtered. Pages and filters are
//! applied by pullcache, as the spec says a registry applies them: Debian's distribution
//! (2.8) ignores `n` and `last`.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use pullcache::authorize::PrivateImages;
use pullcache::config::InterceptSettings;
use pullcache::oci::Registry as RegistryName;
use pullcache::upstream::Credentials;
use serde_json::{Value, json};
use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{OCI_MANIFEST, push_manifest, push_oci_image};
use support::pullcache::Pullcache;
use support::registry::Registry;
use support::spy::SpyServer;
use support::tls::get_through_proxy;
use support::token_service::{ALICE, BOB, CACHE_USER, tenants};

const REGISTRY: &str = "registry.test";
const INTERCEPTED: &str = "registry.test.invalid";

async fn get(url: &str) -> anyhow::Result<(u16, http::HeaderMap, Value)> {
    let resp = support::http_client().get(url).send().await?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.bytes().await?;
    Ok((status, headers, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

fn tags(list: &Value) -> Vec<&str> {
    list["tags"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lists_page_as_the_registry_does_and_are_kept_within_the_tag_ttl() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", &[16 * 1024]).await?;
    for tag in ["v2", "v3"] {
        push_manifest(&upstream.url(), "team/app", tag, OCI_MANIFEST, image.manifest.clone()).await?;
    }
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let base = format!("{}/v2/team/app/tags/list", pullcache.url());

    let (status, _, list) = get(&format!("{base}?ns={REGISTRY}")).await?;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["name"], "team/app");
    assert_eq!(tags(&list), ["v1", "v2", "v3"]);

    let (status, headers, page) = get(&format!("{base}?ns={REGISTRY}&n=2")).await?;
    assert_eq!(status, 200);
    assert_eq!(tags(&page), ["v1", "v2"]);
    let link = headers.get("link").and_then(|l| l.to_str().ok()).unwrap_or_default();
    assert!(
        link.contains("last=v2") && link.contains("rel=\"next\""),
        "Link: {link:?}"
    );
    let (_, _, rest) = get(&format!("{base}?ns={REGISTRY}&n=2&last=v2")).await?;
    assert_eq!(tags(&rest), ["v3"]);

    let head = support::http_client()
        .head(format!("{base}?ns={REGISTRY}"))
        .send()
        .await?;
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"].to_str()?,
        serde_json::to_vec(&list)?.len().to_string().as_str(),
        "HEAD's length is not the list's"
    );

    // Within the TTL: answered without the registry.
    upstream.settle().await?;
    let lists = upstream.access_log_count("GET", "/tags/list");
    for _ in 0..3 {
        let (status, _, again) = get(&format!("{base}?ns={REGISTRY}")).await?;
        assert_eq!((status, tags(&again)), (200, vec!["v1", "v2", "v3"]));
    }
    upstream.settle().await?;
    assert_eq!(upstream.access_log_count("GET", "/tags/list"), lists);

    let (status, _, unknown) = get(&format!("{}/v2/team/none/tags/list?ns={REGISTRY}", pullcache.url())).await?;
    assert_eq!(
        (status, unknown["errors"][0]["code"].as_str()),
        (404, Some("NAME_UNKNOWN"))
    );

    // With a TTL of zero, every request asks the registry.
    let fresh = tempfile::tempdir()?;
    let uncached = Pullcache::start(fresh.path(), &[(REGISTRY, &upstream.url())], Duration::ZERO).await?;
    upstream.settle().await?;
    let before = upstream.access_log_count("GET", "/tags/list");
    for _ in 0..2 {
        let (status, _, _) = get(&format!("{}/v2/team/app/tags/list?ns={REGISTRY}", uncached.url())).await?;
        assert_eq!(status, 200);
    }
    upstream.settle().await?;
    assert_eq!(upstream.access_log_count("GET", "/tags/list"), before + 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_without_referrers_gets_404_and_the_fallback_tag_works() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", &[16 * 1024]).await?;
    // A signature artifact naming the image as its subject, pushed under the fallback tag
    // (`sha256-<hex>`), as cosign and soci do on a registry without the referrers API.
    let empty = push_manifest_blob(&upstream.url(), b"{}").await?;
    let signature = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": image.manifest_digest, "size": image.manifest.len()},
    }))?;
    let fallback = image.manifest_digest.replace(':', "-");
    let signature_digest = push_manifest(
        &upstream.url(),
        "team/app",
        &fallback,
        OCI_MANIFEST,
        Bytes::from(signature),
    )
    .await?;
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;

    let (status, _, body) = get(&format!(
        "{}/v2/team/app/referrers/{}?ns={REGISTRY}",
        pullcache.url(),
        image.manifest_digest
    ))
    .await?;
    assert_eq!(status, 404, "{body}");
    // Not NAME_UNKNOWN: oras-go (soci-snapshotter's referrers client) then gives up instead
    // of trying the fallback tag.
    assert_eq!(body["errors"][0]["code"], "UNSUPPORTED", "{body}");
    let resp = support::http_client()
        .get(format!(
            "{}/v2/team/app/manifests/{fallback}?ns={REGISTRY}",
            pullcache.url()
        ))
        .header("accept", OCI_MANIFEST)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], signature_digest.as_str());
    Ok(())
}

/// Pushes `bytes` as a blob of `team/app`; its digest.
async fn push_manifest_blob(url: &str, bytes: &[u8]) -> anyhow::Result<String> {
    support::images::push_blob(url, "team/app", Bytes::copy_from_slice(bytes)).await
}

/// A registry with the referrers API (a fake: Debian's distribution has none): its answer is
/// read once and kept, and `artifactType` is applied here, with `OCI-Filters-Applied`, as the
/// spec says a registry applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_passed_through_and_filtered() -> anyhow::Result<()> {
    const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
    const SBOM: &str = "application/spdx+json";
    let fake = FaultUpstream::start().await?;
    let subject = format!("sha256:{}", "a".repeat(64));
    let descriptor = |hex: char, kind: &str| json!({"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", hex.to_string().repeat(64)), "size": 500, "artifactType": kind});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor('b', SIG), descriptor('c', SBOM)],
    }))?;
    fake.set(
        &format!("/v2/team/app/referrers/{subject}"),
        Reply::ok(index, &[("content-type", "application/vnd.oci.image.index.v1+json")]),
    );
    let spy = SpyServer::start_forwarding(fake.addr).await?;
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &spy.url())], Duration::from_secs(60)).await?;
    let url = format!("{}/v2/team/app/referrers/{subject}?ns={REGISTRY}", pullcache.url());

    let resp = support::http_client().get(&url).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert!(resp.headers().get("oci-filters-applied").is_none());
    let all: Value = resp.json().await?;
    assert_eq!(all["manifests"], json!([descriptor('b', SIG), descriptor('c', SBOM)]));
    for (kind, hex) in [(SIG, 'b'), (SBOM, 'c')] {
        let resp = support::http_client()
            .get(format!(
                "{url}&artifactType={}",
                kind.replace('/', "%2F").replace('+', "%2B")
            ))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["oci-filters-applied"], "artifactType");
        let filtered: Value = resp.json().await?;
        assert_eq!(filtered["manifests"], json!([descriptor(hex, kind)]), "{kind}");
    }
    let asked = spy
        .requests()
        .iter()
        .filter(|r| r.path().contains("/referrers/"))
        .count();
    assert_eq!(asked, 1, "the referrers were not read once and kept");
    Ok(())
}

/// A private repository's tag list goes only to a client the registry accepts for it: in
/// intercept mode with the client's own token (whether or not pullcache holds credentials),
/// never in mirror mode under `bypass`; a public one to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repositorys_tag_list_goes_only_to_clients_the_registry_accepts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = tenants(&["team-a/app", "public/app"], &["public/app"]).await?;
    let (registry, _) = support::registry::with_token_auth(
        dir.path(),
        &tokens,
        &[("team-a/app", "v1", &[16 * 1024]), ("public/app", "v1", &[16 * 1024])],
    )
    .await?;
    // Leaked: the closure below borrows them for the whole test.
    let alice: &'static str = tokens.pull_token(ALICE, "team-a/app").await?.leak();
    let bob: &'static str = tokens.pull_token(BOB, "team-a/app").await?.leak();
    for credentialed in [false, true] {
        let mut config = support::pullcache::config(dir.path().join(format!("cache-{credentialed}")));
        for name in [INTERCEPTED, REGISTRY] {
            let settings = config.registry(RegistryName::parse(name)?);
            settings.url = Some(registry.url().parse()?);
            if credentialed {
                settings.credentials = Some(Credentials::Basic {
                    username: CACHE_USER.0.to_owned(),
                    password: CACHE_USER.1.to_owned(),
                });
            }
        }
        let ca_dir = dir.path().join(format!("ca-{credentialed}"));
        config.intercept = Some(InterceptSettings {
            ca_dir: ca_dir.clone(),
            tunnel_allow: Vec::new(),
            registries: Vec::new(),
        });
        config.authorize.private_images = PrivateImages::Bypass;
        let pullcache = Pullcache::start_with(config).await?;
        let ca = ca_dir.join(pullcache::ca::CERT_FILE);
        let list = |credential: Option<&'static str>| {
            get_through_proxy(pullcache.addr, INTERCEPTED, &ca, "/v2/team-a/app/tags/list", credential)
        };
        let what = if credentialed {
            "with pullcache's credentials"
        } else {
            "without"
        };
        for _ in 0..2 {
            let got = list(Some(alice)).await?;
            assert_eq!(got.status, 200, "{what}: alice: {:?}", got.body);
            let listed: Value = serde_json::from_slice(&got.body)?;
            assert_eq!(tags(&listed), ["v1"], "{what}");
            for (who, credential) in [("anonymous", None), ("bob", Some(bob))] {
                let got = list(credential).await?;
                assert!(
                    got.status == 401 || got.status == 403,
                    "{what}: {who} got {} {:?}",
                    got.status,
                    got.body
                );
                assert!(
                    !String::from_utf8_lossy(&got.body).contains("\"tags\""),
                    "{what}: {who}"
                );
            }
        }
        // Mirror mode sends no credentials: `bypass` keeps the private list from everyone.
        let (status, _, body) = get(&format!("{}/v2/team-a/app/tags/list?ns={REGISTRY}", pullcache.url())).await?;
        assert!(
            status == 404 || status == 401,
            "{what}: mirror mode served {status} {body}"
        );
        assert!(body.get("tags").is_none(), "{what}: {body}");
        let (status, _, public) = get(&format!("{}/v2/public/app/tags/list?ns={REGISTRY}", pullcache.url())).await?;
        assert_eq!((status, tags(&public)), (200, vec!["v1"]), "{what}");
    }
    Ok(())
}

/// Found by the attack review: a hostile registry's listings are refused, never cut short
/// nor held whole when they are not what they say. A tag list whose `Link` always names a
/// next page gets an error after 64 pages (it used to be served as a whole list of 64 tags,
/// and kept); referrers that are not descriptors (`[0,0,...]`, which parsed as generic JSON
/// cost ~35 bytes of memory per byte) are refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_registrys_listings_are_refused_not_cut_short() -> anyhow::Result<()> {
    let fake = FaultUpstream::start().await?;
    fake.set(
        "/v2/many/tags/list",
        Reply::ok(
            br#"{"name":"many","tags":["a"]}"#.to_vec(),
            &[("link", "</v2/many/tags/list?n=1&last=a>; rel=\"next\"")],
        ),
    );
    let subject = format!("sha256:{}", "a".repeat(64));
    let mut zeros = b"{\"manifests\":[".to_vec();
    zeros.extend(std::iter::repeat_n(b"0,".as_slice(), 400_000).flatten());
    zeros.extend_from_slice(b"0]}");
    fake.set(&format!("/v2/zeros/referrers/{subject}"), Reply::ok(zeros, &[]));
    fake.set(
        "/v2/away/tags/list",
        Reply::ok(
            br#"{"name":"away","tags":["a"]}"#.to_vec(),
            &[(
                "link",
                "<https://elsewhere.example/v2/other/tags/list?n=1>; rel=\"next\"",
            )],
        ),
    );
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &fake.url())], Duration::from_secs(60)).await?;
    let (status, _, body) = get(&format!("{}/v2/many/tags/list?ns={REGISTRY}", pullcache.url())).await?;
    assert_eq!(status, 502, "an endless list: {body}");
    assert_eq!(fake.hits("/v2/many/tags/list"), 64);
    let (status, _, body) = get(&format!("{}/v2/away/tags/list?ns={REGISTRY}", pullcache.url())).await?;
    assert_eq!(status, 502, "a next page elsewhere: {body}");
    let (status, _, body) = get(&format!(
        "{}/v2/zeros/referrers/{subject}?ns={REGISTRY}",
        pullcache.url()
    ))
    .await?;
    assert_eq!(status, 502, "referrers that are not descriptors: {body}");
    assert!(
        body["errors"][0]["message"].as_str().is_some_and(|m| m.contains("not")),
        "{body}"
    );
    Ok(())
}
