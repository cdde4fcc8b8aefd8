//! The hostile-registry catalogue (issue 22): a registry run by an attacker is an ordinary
//! upstream in mirror mode with `_default`, and no answer of its may wedge the node. Each test
//! runs the real binary (JSON logs, stdout and stderr read) against the real registry and
//! [`HostileRegistry`]s, and checks, besides the hostile request's own answer:
//!
//! - the hostile request is answered within a bound, with a 4xx/5xx OCI error (or, for a blob
//!   whose headers had gone out, a body cut short), never a hang and never wrong bytes;
//! - the node keeps serving other images: a cached one, and one it has never seen;
//! - the digests involved are not wedged: the honest registry serving them under another name
//!   is served 200 with the right bytes;
//! - no panic was logged, the resident memory stayed within a bound of its figure at rest, and
//!   no blob in the store fails its digest.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use support::binary::Served;
use support::hostile_registry::{Behaviour, Header, HostileRegistry, Resource, TAG, Victim};
use support::images::{PushedImage, sha256_digest};
use support::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// How long a hostile request may take to be answered when nothing in it is slow: every
/// refusal here is decided on headers or on a bounded body, in well under a second.
const BOUND: Duration = Duration::from_secs(30);
/// `--upstream-timeout` of every node here: how long a registry may send nothing, and the
/// window over which a body must average 1 KiB/s (default 60 s).
const UPSTREAM_TIMEOUT: &str = "3s";
/// How long a body that stalls or trickles may hold its request: pullcache gives up on it
/// after one `--upstream-timeout` window and resumes it up to 3 times (`MAX_RESUMES`,
/// `src/sources.rs`), each at most one window more; 20 s of slack.
const SLOW_BOUND: Duration = Duration::from_secs(3 * 4 + 20);
/// Resident memory the behaviours may add to the figure at rest. Every body pullcache reads
/// is bounded (a token at 1 MiB, a manifest at 4 MiB, a blob's write queue at 4 MiB), and a
/// few requests at once hold a few of each; 64 MiB is that with room for allocator slack,
/// well under what an unbounded read of the 8 MiB token, the 5 MiB manifest or an endless
/// body would take.
const RSS_SLACK: u64 = 64 * 1024 * 1024;
/// Distinct tags asked of a registry that answers every tag name.
const ANY_TAGS: usize = 2000;
/// How deep the nested index goes.
const DEPTH: usize = 1000;
/// The `Accept` of a client that takes every manifest kind.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json";
const GOOD: &str = "good.test";
const HONEST: &str = "honest.test";

/// One hostile registry, under its own name, and the victim image it serves.
struct Case {
    name: String,
    hostile: HostileRegistry,
    victim: Victim,
}

/// A pullcache binary with its upstreams: the real registry (as [`GOOD`] and [`HONEST`]) and
/// one hostile registry per case.
struct Node {
    served: tokio::process::Child,
    addr: String,
    cache: tempfile::TempDir,
    registry: Registry,
    /// stdout and stderr so far, read all along (a full pipe would stall pullcache).
    logs: Arc<Mutex<String>>,
    cases: Vec<Case>,
    good: PushedImage,
    fresh_images: std::sync::atomic::AtomicUsize,
}

impl Node {
    /// Starts the registries and pullcache with `extra` arguments, and pulls one good image.
    async fn start_with(behaviours: Vec<Behaviour>, extra: &[String]) -> Result<Node> {
        let registry = Registry::start().await?;
        let good = support::images::push_oci_image(&registry.url(), "team/good", "v1", &[32 * 1024]).await?;
        let mut cases = Vec::new();
        let mut args = vec![
            "--upstream".to_owned(),
            format!("{GOOD}={}", registry.url()),
            "--upstream".to_owned(),
            format!("{HONEST}={}", registry.url()),
        ];
        for (i, behaviour) in behaviours.into_iter().enumerate() {
            let repository = format!("team/victim-{i}");
            let image = support::images::push_oci_image(&registry.url(), &repository, TAG, &[64 * 1024]).await?;
            let victim = Victim::fetch(&registry.url(), &image).await?;
            let hostile = HostileRegistry::start(behaviour, victim.clone()).await?;
            let name = format!("hostile-{i}.test");
            args.extend(["--upstream".to_owned(), format!("{name}={}", hostile.url())]);
            cases.push(Case { name, hostile, victim });
        }
        let cache = tempfile::tempdir()?;
        args.extend(["--cache-dir".to_owned(), cache.path().display().to_string()]);
        args.extend(["--upstream-timeout".to_owned(), UPSTREAM_TIMEOUT.to_owned()]);
        args.extend(extra.iter().cloned());
        let served = support::binary::serve(&args, "pullcache=info").await?;
        served.wait_ready().await?;
        let Served {
            mut child,
            addr,
            stdout,
            logs,
            ..
        } = served;
        let logs = Arc::new(Mutex::new(logs));
        drain_lines(stdout, logs.clone());
        let stderr = child.stderr.take().context("piped stderr")?;
        drain_lines(tokio::io::BufReader::new(stderr).lines(), logs.clone());
        let node = Node {
            served: child,
            addr,
            cache,
            registry,
            logs,
            cases,
            good,
            fresh_images: Default::default(),
        };
        node.serves_image(GOOD, &node.good)
            .await
            .context("the good image at start")?;
        Ok(node)
    }

    fn url(&self, path: &str, ns: &str) -> String {
        format!("http://{}{path}?ns={ns}", self.addr)
    }

    /// `GET path?ns=ns` within `bound`.
    async fn get(&self, path: &str, ns: &str, bound: Duration) -> Result<Got> {
        get(&self.url(path, ns), bound).await
    }

    /// Every manifest and blob of `image` under `ns`, 200 with the right bytes.
    async fn serves_image(&self, ns: &str, image: &PushedImage) -> Result<()> {
        let name = &image.name;
        for reference in [&image.tag, &image.manifest_digest] {
            let got = self
                .get(&format!("/v2/{name}/manifests/{reference}"), ns, BOUND)
                .await?;
            got.served(&image.manifest_digest)
                .with_context(|| format!("{ns}/{name}:{reference}"))?;
        }
        for blob in &image.blobs {
            let got = self
                .get(&format!("/v2/{name}/blobs/{}", blob.digest), ns, BOUND)
                .await?;
            got.served(&blob.digest).with_context(|| format!("{ns}/{name} blob"))?;
        }
        Ok(())
    }

    /// Other images are served: the cached good one, and one pushed now, never seen before.
    async fn serves_other_images(&self) -> Result<()> {
        self.serves_image(GOOD, &self.good)
            .await
            .context("the cached good image")?;
        let n = self.fresh_images.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("team/fresh-{n}");
        let fresh = support::images::push_oci_image(&self.registry.url(), &name, "v1", &[16 * 1024]).await?;
        self.serves_image(GOOD, &fresh)
            .await
            .context("an image never seen before")
    }

    /// The digests `case`'s registry was attacked with, served under [`HONEST`].
    async fn victim_not_wedged(&self, case: &Case) -> Result<()> {
        let victim = &case.victim;
        let repo = &victim.repository;
        let got = self
            .get(
                &format!("/v2/{repo}/manifests/{}", victim.manifest_digest),
                HONEST,
                BOUND,
            )
            .await?;
        got.served(&victim.manifest_digest)
            .with_context(|| format!("{}'s manifest under {HONEST}", case.name))?;
        for digest in victim.blobs.keys() {
            let got = self.get(&format!("/v2/{repo}/blobs/{digest}"), HONEST, BOUND).await?;
            got.served(digest)
                .with_context(|| format!("{}'s blob {digest} under {HONEST}", case.name))?;
        }
        Ok(())
    }

    /// Resident memory of the pullcache process, in bytes.
    fn rss(&self) -> Result<u64> {
        let pid = self.served.id().context("pullcache has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmRSS")?
            .parse()?;
        Ok(kib * 1024)
    }

    /// What every test asserts after its behaviours: the node serves other images and every
    /// victim, logged no panic, kept its memory within [`RSS_SLACK`] of `rest` and stored
    /// nothing that fails its digest. Returns the resident memory now.
    async fn is_unharmed(&mut self, rest: u64) -> Result<u64> {
        ensure!(self.served.try_wait()?.is_none(), "pullcache exited:\n{}", self.logs());
        self.serves_other_images().await?;
        for case in &self.cases {
            self.victim_not_wedged(case).await?;
        }
        let logs = self.logs();
        ensure!(!logs.contains("panicked"), "pullcache logged a panic:\n{logs}");
        let corrupt = support::pullcache::corrupt_blobs(self.cache.path());
        ensure!(
            corrupt.is_empty(),
            "blobs that fail their digest were stored: {corrupt:?}"
        );
        let after = self.rss()?;
        ensure!(
            after <= rest + RSS_SLACK,
            "resident memory grew from {} to {}",
            mib(rest),
            mib(after)
        );
        Ok(after)
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        support::kill_and_reap(&mut self.served, Duration::from_secs(5));
    }
}

fn drain_lines<R>(mut lines: tokio::io::Lines<R>, into: Arc<Mutex<String>>)
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut logs = into.lock().unwrap();
            logs.push_str(&line);
            logs.push('\n');
        }
    });
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// What a request got.
#[derive(Debug)]
enum Got {
    /// A whole answer.
    Whole {
        status: u16,
        headers: reqwest::header::HeaderMap,
        body: Bytes,
    },
    /// Headers, then a body that broke off before its end.
    Cut { status: u16, error: String },
}

impl Got {
    fn status(&self) -> u16 {
        match self {
            Got::Whole { status, .. } | Got::Cut { status, .. } => *status,
        }
    }

    /// 200 with bytes that hash to `digest`.
    fn served(&self, digest: &str) -> Result<()> {
        match self {
            Got::Whole { status: 200, body, .. } if sha256_digest(body) == digest => Ok(()),
            Got::Whole { status: 200, body, .. } => {
                bail!("200 with {} bytes that are not {digest}", body.len())
            }
            other => bail!("not served: {}", other.describe()),
        }
    }

    /// A 4xx or 5xx with an OCI error body; its code.
    fn refused(&self) -> Result<String> {
        let Got::Whole { status, body, .. } = self else {
            bail!("not refused: {}", self.describe());
        };
        ensure!(*status >= 400, "not refused: {}", self.describe());
        let json: serde_json::Value = serde_json::from_slice(body)
            .with_context(|| format!("{status} without an OCI error: {}", self.describe()))?;
        let code = json["errors"][0]["code"].as_str().unwrap_or_default().to_owned();
        ensure!(!code.is_empty(), "{status} without an OCI error code: {json}");
        Ok(code)
    }

    /// Refused, or (a blob's headers having gone out before the upstream failed) a body cut
    /// short: never a whole 200, whose bytes would be wrong.
    fn refused_or_cut(&self) -> Result<()> {
        match self {
            Got::Cut { .. } => Ok(()),
            _ => self.refused().map(drop),
        }
    }

    fn describe(&self) -> String {
        match self {
            Got::Whole { status, headers, body } => format!(
                "{status} {headers:?} {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ),
            Got::Cut { status, error } => format!("{status}, then the body broke: {error}"),
        }
    }
}

/// `GET url` within `bound`; an error if the answer did not end by then.
async fn get(url: &str, bound: Duration) -> Result<Got> {
    let started = Instant::now();
    let hang = || format!("GET {url}: no whole answer within {bound:?}");
    let resp = support::http_client()
        .get(url)
        .header("accept", ACCEPT)
        .timeout(bound)
        .send()
        .await;
    let resp = match resp {
        Ok(resp) => resp,
        Err(e) if e.is_timeout() => bail!(hang()),
        Err(e) => return Err(e).with_context(|| format!("GET {url}")),
    };
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    match resp.bytes().await {
        Ok(body) => Ok(Got::Whole { status, headers, body }),
        Err(e) if e.is_timeout() || started.elapsed() >= bound => bail!(hang()),
        Err(e) => Ok(Got::Cut {
            status,
            error: chain(&e),
        }),
    }
}

/// An error and its sources, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

/// `GET path` sent as raw bytes to pullcache, read until it closes, within [`BOUND`]: the
/// status and the head exactly as sent.
async fn raw_get(addr: &str, path: &str) -> Result<(u16, Vec<u8>)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: pullcache\r\nAccept: {ACCEPT}\r\nConnection: close\r\n\r\n");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(BOUND, exchange)
        .await
        .with_context(|| format!("GET {path}: no answer within {BOUND:?}"))??;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of head")?;
    let head = response[..end].to_vec();
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .parse()?;
    Ok((status, head))
}

/// Runs `case`'s hostile requests and checks their answers.
async fn attack(node: &Node, case: &Case) -> Result<()> {
    let started = Instant::now();
    let (name, victim) = (case.name.as_str(), &case.victim);
    let repo = &victim.repository;
    let manifest = |reference: &str| format!("/v2/{repo}/manifests/{reference}");
    let blob = |digest: &str| format!("/v2/{repo}/blobs/{digest}");
    let behaviour = case.hostile.behaviour().clone();
    let what = || format!("{name} ({behaviour:?})");
    match &behaviour {
        Behaviour::TokenLifetime(_) => {
            // Clamped: used, and served (README: "a negative or nonsensical lifetime means it
            // is used once and not kept").
            for _ in 0..2 {
                node.get(&blob(&victim.layer), name, BOUND)
                    .await?
                    .served(&victim.layer)
                    .with_context(what)?;
            }
            node.get(&manifest(TAG), name, BOUND)
                .await?
                .served(&victim.manifest_digest)
                .with_context(what)?;
        }
        Behaviour::OversizeToken
        | Behaviour::RedirectToSelf
        | Behaviour::RedirectPingPong
        | Behaviour::RedirectTo(_) => {
            node.get(&blob(&victim.layer), name, BOUND)
                .await?
                .refused()
                .with_context(what)?;
        }
        Behaviour::OversizeManifest | Behaviour::EndlessManifest => {
            for reference in [TAG, victim.manifest_digest.as_str()] {
                let code = node
                    .get(&manifest(reference), name, BOUND)
                    .await?
                    .refused()
                    .with_context(what)?;
                ensure!(code == "MANIFEST_INVALID", "{}: {code}", what());
            }
        }
        Behaviour::LengthOverstated(resource)
        | Behaviour::LengthUnderstated(resource)
        | Behaviour::Stall(resource)
        | Behaviour::Trickle(resource) => {
            let bound = match behaviour {
                Behaviour::Stall(_) | Behaviour::Trickle(_) => SLOW_BOUND,
                _ => BOUND,
            };
            match resource {
                Resource::Blob => node
                    .get(&blob(&victim.layer), name, bound)
                    .await?
                    .refused_or_cut()
                    .with_context(what)?,
                Resource::Manifest => {
                    // At once: a slow answer takes its whole bound.
                    let references = [TAG, victim.manifest_digest.as_str()];
                    let paths = references.map(manifest);
                    let gets = paths.iter().map(|path| node.get(path, name, bound));
                    for got in futures_util::future::join_all(gets).await {
                        got?.refused().with_context(what)?;
                    }
                }
            }
        }
        Behaviour::RetryAfter(_) => rate_limited(node, case).await?,
        Behaviour::ManyLayers(count) => {
            let got = node.get(&manifest(TAG), name, BOUND).await?;
            let digest = case.hostile.tag_digest().context("a manifest of many layers")?;
            if *count > support::hostile_registry::layers_that_fit() {
                let code = got.refused().with_context(what)?;
                ensure!(code == "MANIFEST_INVALID", "{}: {code}", what());
            } else {
                got.served(&digest).with_context(what)?;
                node.get(&manifest(&digest), name, BOUND)
                    .await?
                    .served(&digest)
                    .with_context(what)?;
            }
        }
        Behaviour::DeepIndex(_) => walk_deep_index(node, case).await?,
        Behaviour::IndexCycle => {
            let a = case.hostile.tag_digest().context("index A")?;
            let got = node.get(&manifest(TAG), name, BOUND).await?;
            got.served(&a).with_context(what)?;
            // A lists B, B lists what A is claimed to be; the claim is A's bytes, which are not it.
            for digest in case.hostile.manifest_digests() {
                let got = node.get(&manifest(&digest), name, BOUND).await?;
                if digest == support::hostile_registry::claimed_digest() {
                    got.refused().with_context(what)?;
                } else {
                    got.served(&digest).with_context(what)?;
                }
            }
        }
        Behaviour::IndexRepeats(_) => {
            let index = case.hostile.tag_digest().context("the index")?;
            node.get(&manifest(TAG), name, BOUND)
                .await?
                .served(&index)
                .with_context(what)?;
            node.get(&manifest(&victim.manifest_digest), name, BOUND)
                .await?
                .served(&victim.manifest_digest)
                .with_context(what)?;
        }
        Behaviour::AnyTag => any_tag(node, case).await?,
        Behaviour::ControlChar { header, byte } => control_char(node, case, *header, *byte).await?,
    }
    // The answers above came from the behaviour, not from a refusal before it.
    let seen = case.hostile.seen();
    let wanted = match behaviour {
        Behaviour::TokenLifetime(_) | Behaviour::OversizeToken => "GET /token",
        Behaviour::RedirectPingPong => "GET /bounce/",
        _ => "GET /v2/",
    };
    ensure!(
        seen.iter().any(|line| line.starts_with(wanted)),
        "{}: never sent {wanted}...: {seen:?}",
        what()
    );
    eprintln!("{}: answered in {:?}", what(), started.elapsed());
    Ok(())
}

/// A 429 with a `Retry-After` of years closes the registry for an hour at most: pullcache's
/// own `Retry-After` says so, and the next request does not reach it.
async fn rate_limited(node: &Node, case: &Case) -> Result<()> {
    let path = format!("/v2/{}/blobs/{}", case.victim.repository, case.victim.layer);
    let got = node.get(&path, &case.name, BOUND).await?;
    ensure!(got.status() == 429, "{}: {}", case.name, got.describe());
    got.refused()?;
    let Got::Whole { headers, .. } = &got else {
        unreachable!("refused is whole")
    };
    let retry_after = headers
        .get("retry-after")
        .context("a 429 without Retry-After")?
        .to_str()?;
    let wait = match retry_after.parse::<u64>() {
        Ok(seconds) => seconds,
        Err(_) => httpdate::parse_http_date(retry_after)
            .context("Retry-After neither seconds nor a date")?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs(),
    };
    ensure!(
        (1..=3600).contains(&wait),
        "{}: pullcache told its client Retry-After: {retry_after} ({wait} s), not the hour at most it closes the registry for",
        case.name
    );
    let asked = case.hostile.seen().len();
    let again = node.get(&path, &case.name, BOUND).await?;
    ensure!(again.status() == 429, "{}", again.describe());
    ensure!(
        case.hostile.seen().len() == asked,
        "a closed registry was asked again: {:?}",
        case.hostile.seen()
    );
    Ok(())
}

/// Follows the index from its tag down every level by digest, as a client would.
async fn walk_deep_index(node: &Node, case: &Case) -> Result<()> {
    let repo = &case.victim.repository;
    let mut reference = TAG.to_owned();
    let mut levels = 0;
    loop {
        let got = node
            .get(&format!("/v2/{repo}/manifests/{reference}"), &case.name, BOUND)
            .await?;
        let Got::Whole { status: 200, body, .. } = &got else {
            bail!("level {levels}: {}", got.describe());
        };
        let json: serde_json::Value = serde_json::from_slice(body)?;
        let Some(child) = json["manifests"][0]["digest"].as_str() else {
            ensure!(
                sha256_digest(body) == case.victim.manifest_digest,
                "the bottom is not the victim's manifest"
            );
            break;
        };
        reference = child.to_owned();
        levels += 1;
    }
    ensure!(levels == DEPTH, "walked {levels} levels");
    Ok(())
}

/// [`ANY_TAGS`] distinct tags, 8 at a time, each a valid manifest served.
async fn any_tag(node: &Node, case: &Case) -> Result<()> {
    use futures_util::StreamExt;
    let repo = &case.victim.repository;
    let results: Vec<Result<()>> = futures_util::stream::iter(0..ANY_TAGS)
        .map(|i| async move {
            let got = node
                .get(&format!("/v2/{repo}/manifests/tag-{i}"), &case.name, BOUND)
                .await?;
            ensure!(got.status() == 200, "tag-{i}: {}", got.describe());
            Ok(())
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The hostile header's request gets a clear refusal, and what pullcache sends back carries no
/// control character (the line ends aside).
async fn control_char(node: &Node, case: &Case, header: Header, byte: u8) -> Result<()> {
    let (repo, victim) = (&case.victim.repository, &case.victim);
    let path = match header.resource() {
        Resource::Manifest => format!("/v2/{repo}/manifests/{TAG}?ns={}", case.name),
        Resource::Blob => format!("/v2/{repo}/blobs/{}?ns={}", victim.layer, case.name),
    };
    let (status, head) = raw_get(&node.addr, &path).await?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let bad = head
        .split(|b| *b == b'\n')
        .flat_map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f);
    ensure!(
        !bad,
        "{header:?} with {byte:#04x}: a control character passed on:\n{text:?}"
    );
    ensure!(
        status >= 400,
        "{header:?} with {byte:#04x}: answered {status} from a broken answer:\n{text}"
    );
    Ok(())
}

/// The catalogue, each behaviour once.
fn catalogue() -> Vec<Behaviour> {
    let mut all = vec![
        Behaviour::TokenLifetime("18446744073709551615"),
        Behaviour::TokenLifetime("1e300"),
        Behaviour::TokenLifetime("-1"),
        Behaviour::TokenLifetime("-1e300"),
        Behaviour::OversizeToken,
        Behaviour::OversizeManifest,
        Behaviour::EndlessManifest,
        Behaviour::RedirectToSelf,
        Behaviour::RedirectPingPong,
        Behaviour::RedirectTo("http://169.254.169.254/latest/meta-data/"),
        Behaviour::RedirectTo("http://[fe80::1]/"),
        Behaviour::RedirectTo("http://metadata.google.internal/computeMetadata/v1/"),
        Behaviour::LengthOverstated(Resource::Blob),
        Behaviour::LengthOverstated(Resource::Manifest),
        Behaviour::LengthUnderstated(Resource::Blob),
        Behaviour::LengthUnderstated(Resource::Manifest),
        Behaviour::Stall(Resource::Blob),
        Behaviour::Stall(Resource::Manifest),
        Behaviour::Trickle(Resource::Blob),
        Behaviour::Trickle(Resource::Manifest),
        Behaviour::RetryAfter("999999999"),
        Behaviour::RetryAfter("Thu, 01 Jan 2099 00:00:00 GMT"),
        Behaviour::ManyLayers(100_000),
        Behaviour::ManyLayers(support::hostile_registry::layers_that_fit()),
        Behaviour::DeepIndex(DEPTH),
        Behaviour::IndexCycle,
        Behaviour::IndexRepeats(10_000),
        Behaviour::AnyTag,
    ];
    all.extend(control_chars());
    all
}

fn control_chars() -> Vec<Behaviour> {
    Header::ALL
        .into_iter()
        .flat_map(|header| [0x01, 0x7f, b'\r'].map(|byte| Behaviour::ControlChar { header, byte }))
        .collect()
}

fn is_slow(behaviour: &Behaviour) -> bool {
    matches!(behaviour, Behaviour::Stall(_) | Behaviour::Trickle(_))
}

/// Starts a node on `behaviours`, runs them one after the other (the slow ones alongside, and
/// the checks of other images while they hang), and checks the node after.
async fn run(label: &str, behaviours: Vec<Behaviour>, extra: &[String]) -> Result<()> {
    let started = Instant::now();
    let mut node = Node::start_with(behaviours, extra).await?;
    let rest = node.rss()?;
    let slow: Vec<&Case> = node.cases.iter().filter(|c| is_slow(c.hostile.behaviour())).collect();
    let hanging = futures_util::future::join_all(slow.iter().map(|case| attack(&node, case)));
    // Every behaviour runs whatever failed before it, so every defect shows in one run.
    let quick = async {
        let mut results = Vec::new();
        for case in node.cases.iter().filter(|c| !is_slow(c.hostile.behaviour())) {
            results.push(attack(&node, case).await);
        }
        results.push(while_hanging(&node, &slow).await);
        results
    };
    let (hung, quick) = tokio::join!(hanging, quick);
    let mut failures: Vec<String> = hung
        .into_iter()
        .chain(quick)
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    // The node is checked whatever failed.
    let after = match node.is_unharmed(rest).await {
        Ok(after) => after,
        Err(e) => {
            failures.push(format!("{e:#}"));
            node.rss()?
        }
    };
    eprintln!(
        "{label}: rss at rest {}, after {} ({:?})",
        mib(rest),
        mib(after),
        started.elapsed()
    );
    ensure!(failures.is_empty(), "{label}:\n{}", failures.join("\n"));
    Ok(())
}

/// While the `slow` cases' answers hang, other images and their victims are served.
async fn while_hanging(node: &Node, slow: &[&Case]) -> Result<()> {
    if slow.is_empty() {
        return Ok(());
    }
    // Once every slow request reached its registry (before that, the honest fetch of a victim
    // would store it, and the hostile request would be served from the store)...
    for case in slow {
        let probes = match case.hostile.behaviour() {
            Behaviour::Stall(Resource::Manifest) | Behaviour::Trickle(Resource::Manifest) => 2,
            _ => 1,
        };
        let what = format!("{}'s {probes} request(s) to reach it", case.name);
        support::eventually(BOUND, what, || async {
            let seen = case.hostile.seen();
            seen.iter().filter(|l| l.starts_with("GET /v2/team")).count() >= probes
        })
        .await?;
    }
    // ... and while their answers hang: other images and the victims are served.
    node.serves_other_images().await.context("while bodies hang")?;
    for case in slow {
        node.victim_not_wedged(case).await.context("while its body hangs")?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifetimes_out_of_range() -> Result<()> {
    let lifetimes = ["18446744073709551615", "1e300", "-1", "-1e300"];
    run("token lifetimes", lifetimes.map(Behaviour::TokenLifetime).to_vec(), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_token_body() -> Result<()> {
    run("oversize token", vec![Behaviour::OversizeToken], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_endless_manifest_bodies() -> Result<()> {
    let behaviours = vec![Behaviour::OversizeManifest, Behaviour::EndlessManifest];
    run("oversize manifests", behaviours, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loops() -> Result<()> {
    let behaviours = vec![Behaviour::RedirectToSelf, Behaviour::RedirectPingPong];
    run("redirect loops", behaviours, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_refused_addresses() -> Result<()> {
    let behaviours = [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/",
        "http://metadata.google.internal/computeMetadata/v1/",
    ]
    .map(Behaviour::RedirectTo)
    .to_vec();
    run("refused redirects", behaviours, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_lengths_that_lie() -> Result<()> {
    let behaviours = [Resource::Blob, Resource::Manifest]
        .into_iter()
        .flat_map(|r| [Behaviour::LengthOverstated(r), Behaviour::LengthUnderstated(r)])
        .collect();
    run("lying lengths", behaviours, &[]).await
}

/// See [`SLOW_BOUND`]. A stalled or trickling body is given up after 4 windows (blob: the body
/// is cut; manifest: 502). Before `--upstream-timeout`'s rate floor, a body that trickled a
/// byte every 200 ms was never given up, blob or manifest: the request, its flight, its
/// upstream connection and up to 4 MiB of manifest buffer were held as long as the registry
/// liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_stall_or_never_end() -> Result<()> {
    let behaviours = [Resource::Blob, Resource::Manifest]
        .into_iter()
        .flat_map(|r| [Behaviour::Stall(r), Behaviour::Trickle(r)])
        .collect();
    run("stalled and endless bodies", behaviours, &[]).await
}

/// pullcache closes the registry for an hour at most, and says so. Its first 429 used to relay
/// the registry's `Retry-After` as it came (`999999999`, a date in 2099), telling the client
/// to wait 31 years or 73.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_years() -> Result<()> {
    let behaviours = ["999999999", "Thu, 01 Jan 2099 00:00:00 GMT"]
        .map(Behaviour::RetryAfter)
        .to_vec();
    run("retry-after of years", behaviours, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_with_100000_layers_and_with_as_many_as_fit() -> Result<()> {
    let behaviours = vec![
        Behaviour::ManyLayers(100_000),
        Behaviour::ManyLayers(support::hostile_registry::layers_that_fit()),
    ];
    run("many layers", behaviours, &[]).await
}

/// Pinned too, so an eviction pass walks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_1000_deep() -> Result<()> {
    let pin = ["--pin".to_owned(), format!("hostile-0.test/team/victim-0:{TAG}")];
    run("deep index", vec![Behaviour::DeepIndex(DEPTH)], &pin).await
}

/// Pinned too, so an eviction pass walks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_that_refer_to_themselves() -> Result<()> {
    let mut pins = Vec::new();
    for i in 0..2 {
        pins.extend(["--pin".to_owned(), format!("hostile-{i}.test/team/victim-{i}:{TAG}")]);
    }
    let behaviours = vec![Behaviour::IndexCycle, Behaviour::IndexRepeats(10_000)];
    run("self-referring indexes", behaviours, &pins).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_tag_name_answered() -> Result<()> {
    run("any tag", vec![Behaviour::AnyTag], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_every_header() -> Result<()> {
    run("control characters", control_chars(), &[]).await
}

/// Everything above against one node; the figure for BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_catalogue_against_one_node() -> Result<()> {
    run("hostile catalogue", catalogue(), &[]).await
}
