//! Air-gapped clusters: images exported from a cache as an OCI layout tarball (which skopeo
//! reads too), imported into an empty cache, and pulled by the real containerd from
//! `serve --offline` with every upstream stopped. Bundles made by skopeo and `docker save`
//! import as well; corrupt bundles are refused and change nothing.

use crate::support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use pullcache::oci::Registry as RegistryName;
use support::binary::BIN;
use support::containerd::{Containerd, write_hosts_toml};
use support::images::{
    PushedImage, build_config, build_layer, host_arch, push_oci_image, push_oci_index, sha256_digest,
};
use support::pullcache::{Pullcache, blob_files};
use support::registry::Registry;

const REGISTRY: &str = "registry.test";
const DEAD_SERVER: &str = "http://127.0.0.1:1";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Runs the binary with `args`; its output, whatever the exit status.
async fn pullcache(args: &[&str]) -> anyhow::Result<Output> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .env("PULLCACHE_CACHE_MIN_FREE", "0")
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    Ok(out)
}

async fn pullcache_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = support::check_status(&format!("pullcache {}", args.join(" ")), pullcache(args).await?)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// pullcache serving `cache` with no upstream at all.
async fn serve_offline(cache: &Path) -> anyhow::Result<Pullcache> {
    let mut config = support::pullcache::config(cache.to_owned());
    config.upstream.offline = true;
    // Mapped to a dead port as well: offline must not even try.
    config.registry(RegistryName::parse(REGISTRY)?).url = Some(DEAD_SERVER.parse()?);
    Pullcache::start_with(config).await
}

/// `pullcache export IMAGES... EXTRA... -o BUNDLE` with `REGISTRY` mapped to `upstream`,
/// through a new cache beside the bundle; its summary line.
async fn export(images: &[&str], extra: &[&str], upstream: &Registry, bundle: &Path) -> anyhow::Result<String> {
    let cache = bundle.with_file_name("export-cache");
    let mapping = format!("{REGISTRY}={}", upstream.url());
    let mut args = vec!["export"];
    args.extend(images);
    args.extend(extra);
    args.extend(["-o", path(bundle), "--cache-dir", path(&cache), "--upstream", &mapping]);
    pullcache_ok(&args).await
}

/// Files under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).expect("under root").to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_and_pull_offline() -> anyhow::Result<()> {
    let mut upstream = Registry::start().await?;
    let app = push_oci_image(&upstream.url(), "team/app", "v1", &[512 * 1024, 64 * 1024]).await?;
    let multi = push_oci_index(&upstream.url(), "team/multi", "v2").await?;
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle.tar");
    let platform = format!("linux/{}", host_arch());
    let summary = export(
        &[&app.reference(REGISTRY), &multi.reference(REGISTRY)],
        &["--platform", &platform],
        &upstream,
        &bundle,
    )
    .await?;
    assert!(summary.contains("exported 2 images"), "{summary}");

    // A third-party reader takes it.
    let copied = work.path().join("skopeo-dir");
    support::skopeo::copy(
        &format!("oci-archive:{}:{}", bundle.display(), app.reference(REGISTRY)),
        &format!("dir:{}", copied.display()),
        &[],
    )
    .await?;
    for blob in &app.blobs {
        assert!(
            copied.join(&blob.digest[7..]).exists(),
            "skopeo did not copy {}",
            blob.digest
        );
    }

    // containerd reads it as well, names included.
    let reader = Containerd::start().await?;
    reader.ctr(&["images", "import", path(&bundle)]).await?;
    let listed = reader.ctr(&["images", "ls", "-q"]).await?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in [app.reference(REGISTRY), multi.reference(REGISTRY)] {
        assert!(
            listed.lines().any(|l| l == name),
            "ctr import did not name {name}: {listed}"
        );
    }

    // Carried across: every upstream is gone.
    upstream.stop().await;
    let cache = work.path().join("offline-cache");
    let summary = pullcache_ok(&["import", path(&bundle), "--cache-dir", path(&cache), "--pin"]).await?;
    assert!(summary.contains(&format!("{REGISTRY}/team/app:v1")), "{summary}");
    let pins = std::fs::read_to_string(cache.join("pins"))?;
    assert!(pins.contains("team/multi:v2"), "{pins}");
    // The start says what it keeps: the two pins import saved, and the budget as bytes.
    let mut started = support::binary::serve(
        ["--cache-dir", path(&cache), "--offline", "--cache-max-size", "1GiB"],
        "info",
    )
    .await?;
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = started.stdout.next_line().await? {
            let json: serde_json::Value = serde_json::from_str(&line)?;
            if json["fields"]["message"] == "cache open; ready" {
                return anyhow::Ok(json["fields"].clone());
            }
        }
        anyhow::bail!("no \"cache open; ready\" line")
    })
    .await??;
    assert_eq!(ready["pins"], 2, "{ready}");
    assert_eq!(ready["max_size"], "1073741824 bytes", "{ready}");
    let _ = started.child.start_kill();

    let server = serve_offline(&cache).await?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), REGISTRY, DEAD_SERVER, &server.url());
    let ctr = Containerd::start().await?;
    for image in [&app, &multi] {
        let reference = image.reference(REGISTRY);
        ctr.pull(&reference, hosts.path()).await?;
        assert!(ctr.is_unpacked(&reference).await?, "{reference} did not unpack");
    }

    let resp = support::http_client()
        .get(format!("{}/v2/team/absent/manifests/v1?ns={REGISTRY}", server.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert!(
        json["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not in the offline cache"),
        "{json}"
    );
    // The image as people write it: a tag after `:`, not `@`.
    let message = json["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{REGISTRY}/team/absent:v1")), "{json}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_bundles_import_and_serve() -> anyhow::Result<()> {
    let mut upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/x", "y", &[256 * 1024]).await?;
    let work = tempfile::tempdir()?;
    let source = format!("docker://{}/team/x:y", upstream.host());
    let named = work.path().join("named.tar");
    let unnamed = work.path().join("unnamed.tar");
    let tls = ["--src-tls-verify=false"];
    support::skopeo::copy(
        &source,
        &format!("oci-archive:{}:{REGISTRY}/team/x:y", named.display()),
        &tls,
    )
    .await?;
    support::skopeo::copy(&source, &format!("oci-archive:{}", unnamed.display()), &tls).await?;
    upstream.stop().await;

    let cache = work.path().join("cache");
    pullcache_ok(&["import", path(&named), "--cache-dir", path(&cache)]).await?;
    let summary = pullcache_ok(&[
        "import",
        path(&unnamed),
        "--cache-dir",
        path(&cache),
        "--name",
        &format!("{REGISTRY}/team/renamed:z"),
    ])
    .await?;
    assert!(summary.contains("team/renamed:z"), "{summary}");

    let server = serve_offline(&cache).await?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), REGISTRY, DEAD_SERVER, &server.url());
    let ctr = Containerd::start().await?;
    for reference in [format!("{REGISTRY}/team/x:y"), format!("{REGISTRY}/team/renamed:z")] {
        ctr.pull(&reference, hosts.path()).await?;
        assert!(ctr.is_unpacked(&reference).await?, "{reference} did not unpack");
    }
    assert!(server.stored_blobs().contains(&image.largest_blob().digest));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_save_tarballs_import_and_serve() -> anyhow::Result<()> {
    // `docker save`'s layout: manifest.json, a config file and uncompressed layer tars.
    let layer = build_layer(128 * 1024);
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&layer.blob[..]).read_to_end(&mut tar_bytes)?;
    assert_eq!(sha256_digest(&tar_bytes), layer.diff_id);
    let config = build_config(host_arch(), std::slice::from_ref(&layer.diff_id));
    let config_name = format!("{}.json", &sha256_digest(&config)[7..]);
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [format!("{REGISTRY}/team/saved:v1")],
        "Layers": ["0123abcd/layer.tar"],
    }]);
    let work = tempfile::tempdir()?;
    let saved = work.path().join("saved.tar");
    {
        let mut builder = tar::Builder::new(std::fs::File::create(&saved)?);
        let mut add = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, bytes)?;
            Ok(())
        };
        add("manifest.json", &serde_json::to_vec(&manifest)?)?;
        add(&config_name, &config)?;
        add("0123abcd/layer.tar", &tar_bytes)?;
        add("0123abcd/VERSION", b"1.0")?;
        builder.finish()?;
    }
    let cache = work.path().join("cache");
    let summary = pullcache_ok(&["import", path(&saved), "--cache-dir", path(&cache)]).await?;
    assert!(summary.contains("team/saved:v1"), "{summary}");

    let server = serve_offline(&cache).await?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), REGISTRY, DEAD_SERVER, &server.url());
    let ctr = Containerd::start().await?;
    let reference = format!("{REGISTRY}/team/saved:v1");
    ctr.pull(&reference, hosts.path()).await?;
    assert!(ctr.is_unpacked(&reference).await?, "{reference} did not unpack");
    assert!(
        server.stored_blobs().contains(&layer.diff_id),
        "the layer is stored uncompressed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bundles_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", &[64 * 1024]).await?;
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle.tar");
    export(&[&image.reference(REGISTRY)], &[], &upstream, &bundle).await?;
    let layer = &image.layers()[0].digest;
    let layer_file = |dir: &Path| dir.join("blobs/sha256").join(&layer[7..]);

    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 3] = [
        (
            "a flipped byte",
            |f| {
                let mut bytes = std::fs::read(f).unwrap();
                bytes[100] ^= 0xff;
                std::fs::write(f, bytes).unwrap();
            },
            "does not match its digest",
        ),
        (
            "a missing blob",
            |f| std::fs::remove_file(f).unwrap(),
            "bundle lacks blob",
        ),
        (
            "a wrong size",
            |f| {
                let bytes = std::fs::read(f).unwrap();
                std::fs::write(f, &bytes[..bytes.len() - 10]).unwrap();
            },
            "its descriptor says",
        ),
    ];
    for (what, damage, expected) in cases {
        let dir = work.path().join(what.replace(' ', "-"));
        std::fs::create_dir_all(&dir)?;
        tar::Archive::new(std::fs::File::open(&bundle)?).unpack(&dir)?;
        damage(&layer_file(&dir));
        let cache = work.path().join(format!("cache-{}", what.replace(' ', "-")));
        // A cache with everything but the layer: it must stay exactly as it is.
        pullcache_ok(&["import", path(&bundle), "--cache-dir", path(&cache)]).await?;
        std::fs::remove_file(cache.join("blobs/sha256").join(&layer[7..9]).join(&layer[7..]))?;
        let before = tree(&cache);

        let out = pullcache(&["import", path(&dir), "--cache-dir", path(&cache)]).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(expected) && stderr.contains(layer.as_str()),
            "{what}: {stderr}"
        );
        assert_eq!(tree(&cache), before, "{what}: the cache changed");
        assert!(
            blob_files(&cache).iter().all(|p| !p.ends_with(&layer[7..])),
            "{what}: the layer was stored"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_warms_a_server_and_shows_progress_only_on_a_terminal() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/big", "v1", &[4 * 1024 * 1024]).await?;
    let work = tempfile::tempdir()?;
    let list = work.path().join("images.txt");
    std::fs::write(&list, format!("# warm these\n\n{REGISTRY}/team/big:v1\n"))?;

    // A running instance, warmed through its API.
    let server = Pullcache::start(
        &work.path().join("served"),
        &[(REGISTRY, &upstream.url())],
        Duration::from_secs(60),
    )
    .await?;
    let out = pullcache(&["prefetch", "--from-file", path(&list), "--server", &server.url()]).await?;
    let out = support::check_status("prefetch --server", out)?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("prefetched 1 images"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("B/s"), "progress drawn on a pipe: {stderr}");
    let stored = server.stored_blobs();
    for blob in &image.blobs {
        assert!(stored.contains(&blob.digest), "prefetch did not cache {}", blob.digest);
    }

    // A cache directory, on a terminal: the bar shows bytes and rate.
    let cache = work.path().join("direct");
    let command = format!(
        "{BIN} prefetch {REGISTRY}/team/big:v1 --cache-dir {} --upstream {REGISTRY}={} --cache-min-free 0",
        cache.display(),
        upstream.url()
    );
    let out = tokio::process::Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .output()
        .await?;
    let out = support::check_status("prefetch under script(1)", out)?;
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(
        terminal.contains("B/s") && terminal.contains("MiB"),
        "no progress bar on a terminal: {terminal}"
    );
    assert!(terminal.contains("prefetched 1 images"), "{terminal}");
    assert!(
        blob_files(&cache).len() > image.blobs.len(),
        "the manifest and every blob are cached"
    );
    Ok(())
}

/// Images that share the tag `v1` in two repositories (an image and a multi-platform index),
/// and a third named by digest alone, exported from a registry of their own into one bundle.
/// Each is listed with the full name the bundle should give it.
struct SharedTagBundle {
    images: Vec<(String, PushedImage)>,
    bundle: PathBuf,
    work: tempfile::TempDir,
}

async fn shared_tag_bundle() -> anyhow::Result<SharedTagBundle> {
    let upstream = Registry::start().await?;
    let app = push_oci_image(&upstream.url(), "team/app", "v1", &[128 * 1024]).await?;
    let multi = push_oci_index(&upstream.url(), "team/multi", "v1").await?;
    let pinned = push_oci_image(&upstream.url(), "team/pinned", "old", &[64 * 1024]).await?;
    let images = vec![
        (app.reference(REGISTRY), app),
        (multi.reference(REGISTRY), multi),
        (pinned.digest_reference(REGISTRY), pinned),
    ];
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle.tar");
    let names: Vec<&str> = images.iter().map(|(name, _)| name.as_str()).collect();
    let summary = export(&names, &[], &upstream, &bundle).await?;
    assert!(summary.contains("exported 3 images"), "{summary}");
    Ok(SharedTagBundle { images, bundle, work })
}

/// Imports `bundle` into a new cache, serves it offline and checks that every name answers
/// with its image's manifest.
async fn assert_import_serves(bundle: &Path, cache: &Path, images: &[(String, PushedImage)]) -> anyhow::Result<()> {
    let summary = pullcache_ok(&["import", path(bundle), "--cache-dir", path(cache)]).await?;
    let server = serve_offline(cache).await?;
    for (name, image) in images {
        assert!(summary.contains(name.as_str()), "import did not name {name}: {summary}");
        let parsed = pullcache::oci::ImageRef::parse(name)?;
        let resp = support::http_client()
            .get(format!(
                "{}/v2/{}/manifests/{}?ns={REGISTRY}",
                server.url(),
                parsed.repository,
                parsed.reference
            ))
            .header("accept", &image.manifest_media_type)
            .send()
            .await?;
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(
            resp.headers()["docker-content-digest"],
            image.manifest_digest.as_str(),
            "{name}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_sharing_a_tag_are_told_apart_by_full_name() -> anyhow::Result<()> {
    let SharedTagBundle {
        images, bundle, work, ..
    } = shared_tag_bundle().await?;

    // skopeo picks each by the full name in ref.name, and gets its manifest unchanged.
    for (n, (name, image)) in images.iter().enumerate() {
        let copied = work.path().join(format!("skopeo-{n}"));
        support::skopeo::copy(
            &format!("oci-archive:{}:{name}", bundle.display()),
            &format!("dir:{}", copied.display()),
            &["--all"],
        )
        .await?;
        let manifest = std::fs::read(copied.join("manifest.json"))?;
        assert_eq!(sha256_digest(&manifest), image.manifest_digest, "skopeo copied {name}");
    }

    // containerd names every image, each with its own digest.
    let reader = Containerd::start().await?;
    reader.ctr(&["images", "import", path(&bundle)]).await?;
    let listed = reader.ctr(&["images", "ls"]).await?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    for (name, image) in &images {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str()) && l.contains(&image.manifest_digest)),
            "ctr import did not name {name} as {}: {listed}",
            image.manifest_digest
        );
    }

    assert_import_serves(&bundle, &work.path().join("cache"), &images).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_naming_only_the_tag_in_ref_name_still_import() -> anyhow::Result<()> {
    let SharedTagBundle {
        images, bundle, work, ..
    } = shared_tag_bundle().await?;
    // Written the old way: the tag alone in ref.name, the full name in containerd's annotation.
    let dir = work.path().join("old-bundle");
    tar::Archive::new(std::fs::File::open(&bundle)?).unpack(&dir)?;
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    for entry in index["manifests"].as_array_mut().expect("index.json lists manifests") {
        let annotations = &mut entry["annotations"];
        let name = annotations["io.containerd.image.name"].clone();
        let name = name.as_str().expect("every image is named");
        assert_eq!(annotations[REF_NAME], name, "ref.name holds the full name");
        if let Some((_, tag)) = name.rsplit_once(':').filter(|_| !name.contains('@')) {
            annotations[REF_NAME] = tag.into();
        }
    }
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;

    assert_import_serves(&dir, &work.path().join("cache"), &images).await
}

/// A bundle whose `index.json` gave a manifest a media type with a control character imported
/// with exit 0, and every later GET of that manifest panicked building its `Content-Type`.
/// Now the media type is checked at import: the bundle is refused, naming the manifest, and
/// the cache is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_with_a_media_type_that_is_not_one_is_refused() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", &[16 * 1024]).await?;
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle.tar");
    export(&[&image.reference(REGISTRY)], &[], &upstream, &bundle).await?;
    let dir = work.path().join("bad-media-type");
    tar::Archive::new(std::fs::File::open(&bundle)?).unpack(&dir)?;
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    for entry in index["manifests"].as_array_mut().expect("index.json lists manifests") {
        entry["mediaType"] = "application/vnd.oci.image.manifest.v1+json\u{7}".into();
    }
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;

    let cache = work.path().join("cache");
    std::fs::create_dir_all(&cache)?;
    let before = tree(&cache);
    let out = pullcache(&["import", path(&dir), "--cache-dir", path(&cache)]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not a media type") && stderr.contains(&image.manifest_digest),
        "{stderr}"
    );
    assert_eq!(tree(&cache), before, "the cache changed");
    Ok(())
}

/// Without `--cache-dir`, export fetches through a temporary cache it removes: the default
/// cache (/var/lib/pullcache for root) is neither created nor filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_without_a_cache_dir_leaves_no_cache_behind() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", &[64 * 1024]).await?;
    let work = tempfile::tempdir()?;
    let (bundle, tmp) = (work.path().join("bundle.tar"), work.path().join("tmp"));
    std::fs::create_dir(&tmp)?;
    let default_cache = pullcache::config::default_cache_dir();
    let before = default_cache.exists().then(|| tree(&default_cache));
    let mapping = format!("{REGISTRY}={}", upstream.url());
    let reference = image.reference(REGISTRY);
    let out = tokio::process::Command::new(BIN)
        .args(["export", &reference, "-o", path(&bundle), "--upstream", &mapping])
        .env("TMPDIR", &tmp)
        .env("PULLCACHE_CACHE_MIN_FREE", "0")
        .env_remove("PULLCACHE_CACHE_DIR")
        .output()
        .await?;
    let out = support::check_status("pullcache export", out)?;
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("exported 1 images") && summary.contains("temporary cache"),
        "{summary}"
    );
    assert!(bundle.exists());
    assert_eq!(
        std::fs::read_dir(&tmp)?.count(),
        0,
        "the temporary cache was left behind"
    );
    assert_eq!(
        default_cache.exists().then(|| tree(&default_cache)),
        before,
        "export changed {}",
        default_cache.display()
    );
    Ok(())
}
