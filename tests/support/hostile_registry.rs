//! A registry run by an attacker, on `127.0.0.1:0`, with a catalogue of [`Behaviour`]s. It is
//! written on raw TCP with hand-written HTTP/1.1 answers (`Connection: close`), because what it
//! must send is what hyper refuses to: control characters in header values, a
//! `Content-Length` that lies, a body that never ends.
//!
//! Whatever its behaviour does not touch is served honestly from a [`Victim`], an image the
//! real registry serves too: after the attack, an honest registry serving the same digests
//! shows whether the node was wedged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::images::{OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, PushedImage, host_arch, sha256_digest};

/// The tag every manifest behaviour answers at (`AnyTag` answers them all).
pub const TAG: &str = "v1";
/// The most a manifest may weigh (pullcache and distribution alike).
pub const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;
/// How often a trickling body sends its next byte.
pub const TRICKLE_EVERY: Duration = Duration::from_millis(200);
/// The token body's size for [`Behaviour::OversizeToken`].
pub const OVERSIZE_TOKEN: usize = 8 * 1024 * 1024;
/// The size of [`Behaviour::OversizeManifest`]'s body.
pub const OVERSIZE_MANIFEST: usize = 5 * 1024 * 1024;

/// Which answer a behaviour corrupts; the other kind is served honestly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Manifest,
    Blob,
}

/// A response header [`Behaviour::ControlChar`] puts a byte into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Of a manifest's 200.
    ContentType,
    /// Of a manifest's 200.
    DockerContentDigest,
    /// Of a manifest's 401.
    WwwAuthenticate,
    /// Of a blob's 307.
    Location,
    /// Of a blob's 429.
    RetryAfter,
    /// Of a blob's 200.
    ContentLength,
}

impl Header {
    pub const ALL: [Header; 6] = [
        Header::ContentType,
        Header::DockerContentDigest,
        Header::WwwAuthenticate,
        Header::Location,
        Header::RetryAfter,
        Header::ContentLength,
    ];

    /// The request that meets it.
    pub fn resource(self) -> Resource {
        match self {
            Header::ContentType | Header::DockerContentDigest | Header::WwwAuthenticate => Resource::Manifest,
            Header::Location | Header::RetryAfter | Header::ContentLength => Resource::Blob,
        }
    }
}

/// What the hostile registry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Every `/v2/` path demands a Bearer token; the realm answers `expires_in` with this raw
    /// JSON number. With the token, the victim is served honestly.
    TokenLifetime(&'static str),
    /// The realm answers a valid token JSON of [`OVERSIZE_TOKEN`] bytes.
    OversizeToken,
    /// The tag and the victim's digest answer [`OVERSIZE_MANIFEST`] bytes, `Content-Length`
    /// said.
    OversizeManifest,
    /// The tag and the victim's digest answer a manifest body without `Content-Length` that
    /// never ends, at full speed.
    EndlessManifest,
    /// A blob GET is answered 307 to itself.
    RedirectToSelf,
    /// A blob GET is answered 307 to `/bounce/...`, which answers 307 back to the blob.
    RedirectPingPong,
    /// A blob GET is answered 307 to this URL (a cloud metadata or link-local address).
    RedirectTo(&'static str),
    /// `Content-Length` says 1000 bytes more than is sent; then the connection closes.
    LengthOverstated(Resource),
    /// `Content-Length` says 1000 bytes fewer than the body that is sent.
    LengthUnderstated(Resource),
    /// Headers (with the honest `Content-Length`), then nothing, forever.
    Stall(Resource),
    /// Headers without `Content-Length`, then a byte every [`TRICKLE_EVERY`], forever.
    Trickle(Resource),
    /// A blob GET is answered 429 with this `Retry-After`.
    RetryAfter(&'static str),
    /// The tag (and its digest) is a manifest with this many layers.
    ManyLayers(usize),
    /// The tag is an index, each level listing the next by digest, this many deep; the last
    /// lists the victim's manifest.
    DeepIndex(usize),
    /// The tag is index A, listing index B, listing A's *claimed* digest ([`claimed_digest`]),
    /// which the registry answers with A's bytes (and the claim in `Docker-Content-Digest`).
    IndexCycle,
    /// The tag is an index listing the victim's manifest (also the tag's child) this many times.
    IndexRepeats(usize),
    /// Every tag name is answered with a fresh small valid manifest (the victim's, annotated
    /// with the tag).
    AnyTag,
    /// `byte` in the middle of one header's value (the request [`Header::resource`] says).
    ControlChar { header: Header, byte: u8 },
}

impl Behaviour {
    /// Whether the realm and a token are involved.
    fn wants_token(&self) -> bool {
        matches!(self, Behaviour::TokenLifetime(_) | Behaviour::OversizeToken)
    }
}

/// The honest content: an image whose manifest and blobs the real registry serves too.
#[derive(Debug, Clone)]
pub struct Victim {
    pub repository: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    /// Config and layers, by digest.
    pub blobs: HashMap<String, Vec<u8>>,
    /// The layer's digest.
    pub layer: String,
}

impl Victim {
    /// A pushed image and its blobs read back from the registry at `registry_url`.
    pub async fn fetch(registry_url: &str, image: &PushedImage) -> Result<Victim> {
        let mut blobs = HashMap::new();
        for blob in &image.blobs {
            let url = format!("{registry_url}/v2/{}/blobs/{}", image.name, blob.digest);
            let resp = super::http_client().get(&url).send().await?.error_for_status()?;
            blobs.insert(blob.digest.clone(), resp.bytes().await?.to_vec());
        }
        Ok(Victim {
            repository: image.name.clone(),
            manifest: image.manifest.to_vec(),
            manifest_digest: image.manifest_digest.clone(),
            blobs,
            layer: image.layers().first().context("the victim has a layer")?.digest.clone(),
        })
    }

    /// The victim's config descriptor, as JSON.
    fn config(&self) -> serde_json::Value {
        let manifest: serde_json::Value = serde_json::from_slice(&self.manifest).expect("the victim's manifest");
        manifest["config"].clone()
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": self.manifest.len(),
            "platform": {"os": "linux", "architecture": host_arch()},
        })
    }
}

/// The digest index B lists for [`Behaviour::IndexCycle`]: what the registry claims index A is.
pub fn claimed_digest() -> String {
    sha256_digest(b"index A, as its registry claims it")
}

/// How many layers fit a manifest under [`MANIFEST_LIMIT`] (with 4 KiB to spare for the rest).
pub fn layers_that_fit() -> usize {
    // The longest descriptor of any that fit (its size field has the most digits), and a comma.
    let one = serde_json::to_vec(&layer(100_000)).expect("json").len() + 1;
    (MANIFEST_LIMIT - 4096) / one
}

fn layer(i: usize) -> serde_json::Value {
    json!({"mediaType": OCI_LAYER_GZIP, "digest": format!("sha256:{i:064x}"), "size": 1024 + i})
}

/// What the registry answers, written on the socket as is.
enum Answer {
    /// Head and body, then close.
    Whole(Vec<u8>, Vec<u8>),
    /// Head, then nothing until the registry is dropped.
    Stall(Vec<u8>),
    /// Head, then a byte every [`TRICKLE_EVERY`].
    Trickle(Vec<u8>),
    /// Head, then bytes as fast as the peer takes them.
    Endless(Vec<u8>),
}

/// Manifests the registry serves by digest, and by the tag.
#[derive(Default)]
struct Manifests {
    by_digest: HashMap<String, (&'static str, Vec<u8>)>,
    tag: Option<(&'static str, Vec<u8>)>,
}

impl Manifests {
    fn add(&mut self, media_type: &'static str, bytes: Vec<u8>) -> String {
        let digest = sha256_digest(&bytes);
        self.by_digest.insert(digest.clone(), (media_type, bytes));
        digest
    }

    /// The manifests a behaviour serves besides the victim's.
    fn for_behaviour(behaviour: &Behaviour, victim: &Victim) -> Manifests {
        let mut m = Manifests::default();
        let index = |manifests: Vec<serde_json::Value>| {
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
                .expect("json")
        };
        match behaviour {
            Behaviour::ManyLayers(count) => {
                let layers: Vec<_> = (0..*count).map(layer).collect();
                let body =
                    json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": victim.config(), "layers": layers});
                let bytes = serde_json::to_vec(&body).expect("json");
                m.add(OCI_MANIFEST, bytes.clone());
                m.tag = Some((OCI_MANIFEST, bytes));
            }
            Behaviour::DeepIndex(depth) => {
                let mut child = victim.descriptor();
                for _ in 0..*depth {
                    let bytes = index(vec![child]);
                    let size = bytes.len();
                    let digest = m.add(OCI_INDEX, bytes.clone());
                    child = json!({"mediaType": OCI_INDEX, "digest": digest, "size": size});
                    m.tag = Some((OCI_INDEX, bytes));
                }
            }
            Behaviour::IndexCycle => {
                let claimed = json!({"mediaType": OCI_INDEX, "digest": claimed_digest(), "size": 4096});
                let b = index(vec![claimed]);
                let (b_size, b_digest) = (b.len(), m.add(OCI_INDEX, b));
                let a = index(vec![
                    json!({"mediaType": OCI_INDEX, "digest": b_digest, "size": b_size}),
                ]);
                m.add(OCI_INDEX, a.clone());
                m.by_digest.insert(claimed_digest(), (OCI_INDEX, a.clone()));
                m.tag = Some((OCI_INDEX, a));
            }
            Behaviour::IndexRepeats(times) => {
                let bytes = index(vec![victim.descriptor(); *times]);
                m.add(OCI_INDEX, bytes.clone());
                m.tag = Some((OCI_INDEX, bytes));
            }
            _ => {}
        }
        m
    }
}

struct State {
    addr: SocketAddr,
    behaviour: Behaviour,
    victim: Victim,
    manifests: Manifests,
    /// Tags [`Behaviour::AnyTag`] answered, by the digest of the manifest it made.
    made: Mutex<HashMap<String, Vec<u8>>>,
    /// Request lines seen, in order (`GET /v2/...`).
    seen: Mutex<Vec<String>>,
}

pub struct HostileRegistry {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileRegistry {
    pub async fn start(behaviour: Behaviour, victim: Victim) -> Result<HostileRegistry> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let manifests = Manifests::for_behaviour(&behaviour, &victim);
        let state = Arc::new(State {
            addr,
            behaviour,
            victim,
            manifests,
            made: Mutex::default(),
            seen: Mutex::default(),
        });
        let shared = state.clone();
        // The connections live in the accept task's set: aborting it (on drop) ends every
        // stalled or trickling answer too.
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            connections.spawn(serve(stream, shared.clone()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(HostileRegistry { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn behaviour(&self) -> &Behaviour {
        &self.state.behaviour
    }

    /// The request lines it was sent, in order.
    pub fn seen(&self) -> Vec<String> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The digest of the manifest the tag is answered with, when the behaviour makes one.
    pub fn tag_digest(&self) -> Option<String> {
        let (_, bytes) = self.state.manifests.tag.as_ref()?;
        Some(sha256_digest(bytes))
    }

    /// Every manifest it serves by digest besides the victim's.
    pub fn manifest_digests(&self) -> Vec<String> {
        self.state.manifests.by_digest.keys().cloned().collect()
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request's head; `None` if the peer closed or sent garbage.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(head).ok()
}

async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    state.seen.lock().unwrap().push(request_line.clone());
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let answer = answer(&state, path, header("authorization").as_deref());
    let head_only = method == "HEAD";
    let _ = write(&mut stream, answer, head_only).await;
}

async fn write(stream: &mut TcpStream, answer: Answer, head_only: bool) -> std::io::Result<()> {
    match answer {
        Answer::Whole(head, body) => {
            stream.write_all(&head).await?;
            if !head_only {
                stream.write_all(&body).await?;
            }
            stream.shutdown().await
        }
        Answer::Stall(head) => {
            stream.write_all(&head).await?;
            std::future::pending().await
        }
        Answer::Trickle(head) => {
            stream.write_all(&head).await?;
            loop {
                tokio::time::sleep(TRICKLE_EVERY).await;
                stream.write_all(b" ").await?;
            }
        }
        Answer::Endless(head) => {
            stream.write_all(&head).await?;
            let chunk = vec![b' '; 64 * 1024];
            loop {
                stream.write_all(&chunk).await?;
            }
        }
    }
}

/// A response head: status line, `headers` (values as raw bytes, sent as they are) and
/// `Connection: close`.
fn head(status: u16, headers: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        _ => "Whatever",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

fn text(value: impl ToString) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// `value` with `byte` in its middle.
fn tainted(value: &str, byte: u8) -> Vec<u8> {
    let mut bytes = value.as_bytes().to_vec();
    bytes.insert(bytes.len() / 2, byte);
    bytes
}

/// An honest 200 of `body`.
fn ok(media_type: &str, body: Vec<u8>, digest: Option<&str>) -> Answer {
    let mut headers = vec![("Content-Type", text(media_type)), ("Content-Length", text(body.len()))];
    if let Some(digest) = digest {
        headers.push(("Docker-Content-Digest", text(digest)));
    }
    Answer::Whole(head(200, &headers), body)
}

fn not_found() -> Answer {
    let body = br#"{"errors":[{"code":"NOT_FOUND","message":"not here"}]}"#.to_vec();
    Answer::Whole(head(404, &[("Content-Length", text(body.len()))]), body)
}

fn answer(state: &State, path: &str, auth: Option<&str>) -> Answer {
    let behaviour = &state.behaviour;
    if path == "/token" {
        return token(behaviour);
    }
    if let Some(rest) = path.strip_prefix("/bounce/") {
        let location = format!("http://{}/v2/{rest}", state.addr);
        return Answer::Whole(
            head(307, &[("Location", text(location)), ("Content-Length", text(0))]),
            Vec::new(),
        );
    }
    if behaviour.wants_token() && auth != Some("Bearer hostile-token") {
        let challenge = format!(r#"Bearer realm="http://{}/token",service="hostile""#, state.addr);
        return Answer::Whole(
            head(
                401,
                &[("WWW-Authenticate", text(challenge)), ("Content-Length", text(0))],
            ),
            Vec::new(),
        );
    }
    if path == "/v2/" {
        return ok("application/json", b"{}".to_vec(), None);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return not_found();
    };
    if let Some((repository, reference)) = rest.rsplit_once("/manifests/") {
        return manifest(state, repository, reference);
    }
    if let Some((repository, digest)) = rest.rsplit_once("/blobs/") {
        return blob(state, repository, digest);
    }
    not_found()
}

fn token(behaviour: &Behaviour) -> Answer {
    let body = match behaviour {
        Behaviour::TokenLifetime(lifetime) => format!(r#"{{"token":"hostile-token","expires_in":{lifetime}}}"#),
        Behaviour::OversizeToken => {
            let padding = "a".repeat(OVERSIZE_TOKEN);
            format!(r#"{{"token":"hostile-token","expires_in":300,"padding":"{padding}"}}"#)
        }
        _ => r#"{"token":"hostile-token","expires_in":300}"#.to_owned(),
    };
    ok("application/json", body.into_bytes(), None)
}

/// The honest manifest for `reference`, if the registry has one: (media type, bytes).
fn honest_manifest(state: &State, reference: &str) -> Option<(&'static str, Vec<u8>)> {
    let victim = &state.victim;
    if let Some(found) = state.manifests.by_digest.get(reference) {
        return Some(found.clone());
    }
    if let Some(bytes) = state.made.lock().unwrap().get(reference) {
        return Some((OCI_MANIFEST, bytes.clone()));
    }
    if reference == victim.manifest_digest {
        return Some((OCI_MANIFEST, victim.manifest.clone()));
    }
    if reference.starts_with("sha256:") {
        return None;
    }
    if state.behaviour == Behaviour::AnyTag {
        let mut manifest: serde_json::Value = serde_json::from_slice(&victim.manifest).expect("json");
        manifest["annotations"] = json!({ "tag": reference });
        let bytes = serde_json::to_vec(&manifest).expect("json");
        state.made.lock().unwrap().insert(sha256_digest(&bytes), bytes.clone());
        return Some((OCI_MANIFEST, bytes));
    }
    if reference != TAG {
        return None;
    }
    Some(
        state
            .manifests
            .tag
            .clone()
            .unwrap_or((OCI_MANIFEST, victim.manifest.clone())),
    )
}

fn manifest(state: &State, _repository: &str, reference: &str) -> Answer {
    let Some((media_type, bytes)) = honest_manifest(state, reference) else {
        return not_found();
    };
    let digest = sha256_digest(&bytes);
    match state.behaviour {
        Behaviour::OversizeManifest => {
            let mut body =
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"x":""#
                    .to_vec();
            body.resize(OVERSIZE_MANIFEST - 3, b'a');
            body.extend_from_slice(br#""}}"#);
            ok(OCI_MANIFEST, body, None)
        }
        Behaviour::EndlessManifest => Answer::Endless(head(200, &[("Content-Type", text(OCI_MANIFEST))])),
        Behaviour::IndexCycle if reference == claimed_digest() => ok(OCI_INDEX, bytes, Some(&claimed_digest())),
        Behaviour::ControlChar { header, byte } if header.resource() == Resource::Manifest => {
            control_char_manifest(state, header, byte, media_type, bytes, &digest)
        }
        Behaviour::LengthOverstated(Resource::Manifest)
        | Behaviour::LengthUnderstated(Resource::Manifest)
        | Behaviour::Stall(Resource::Manifest)
        | Behaviour::Trickle(Resource::Manifest) => lying(&state.behaviour, media_type, bytes, &digest),
        _ => ok(media_type, bytes, Some(&digest)),
    }
}

fn control_char_manifest(
    state: &State,
    header: Header,
    byte: u8,
    media_type: &str,
    bytes: Vec<u8>,
    digest: &str,
) -> Answer {
    let length = ("Content-Length", text(bytes.len()));
    match header {
        Header::ContentType => Answer::Whole(
            head(
                200,
                &[
                    ("Content-Type", tainted(media_type, byte)),
                    length,
                    ("Docker-Content-Digest", text(digest)),
                ],
            ),
            bytes,
        ),
        Header::DockerContentDigest => Answer::Whole(
            head(
                200,
                &[
                    ("Content-Type", text(media_type)),
                    length,
                    ("Docker-Content-Digest", tainted(digest, byte)),
                ],
            ),
            bytes,
        ),
        _ => {
            let challenge = format!(r#"Bearer realm="http://{}/token",service="hostile""#, state.addr);
            Answer::Whole(
                head(
                    401,
                    &[
                        ("WWW-Authenticate", tainted(&challenge, byte)),
                        ("Content-Length", text(0)),
                    ],
                ),
                Vec::new(),
            )
        }
    }
}

/// The answers whose length or pace lies, for `bytes` whatever resource they are.
fn lying(behaviour: &Behaviour, media_type: &str, bytes: Vec<u8>, digest: &str) -> Answer {
    let with_length = |length: usize| {
        head(
            200,
            &[
                ("Content-Type", text(media_type)),
                ("Content-Length", text(length)),
                ("Docker-Content-Digest", text(digest)),
            ],
        )
    };
    match behaviour {
        Behaviour::LengthOverstated(_) => Answer::Whole(with_length(bytes.len() + 1000), bytes),
        Behaviour::LengthUnderstated(_) => Answer::Whole(with_length(bytes.len().saturating_sub(1000)), bytes),
        Behaviour::Stall(_) => Answer::Stall(with_length(bytes.len())),
        _ => Answer::Trickle(head(
            200,
            &[
                ("Content-Type", text(media_type)),
                ("Docker-Content-Digest", text(digest)),
            ],
        )),
    }
}

fn blob(state: &State, repository: &str, digest: &str) -> Answer {
    let Some(bytes) = state.victim.blobs.get(digest).cloned() else {
        return not_found();
    };
    let here = format!("http://{}/v2/{repository}/blobs/{digest}", state.addr);
    let redirect = |location: Vec<u8>| {
        Answer::Whole(
            head(307, &[("Location", location), ("Content-Length", text(0))]),
            Vec::new(),
        )
    };
    let too_many = |retry_after: Vec<u8>| {
        let body = br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#.to_vec();
        Answer::Whole(
            head(
                429,
                &[("Retry-After", retry_after), ("Content-Length", text(body.len()))],
            ),
            body,
        )
    };
    match state.behaviour {
        Behaviour::RedirectToSelf => redirect(text(here)),
        Behaviour::RedirectPingPong => redirect(text(format!(
            "http://{}/bounce/{repository}/blobs/{digest}",
            state.addr
        ))),
        Behaviour::RedirectTo(url) => redirect(text(url)),
        Behaviour::RetryAfter(value) => too_many(text(value)),
        Behaviour::ControlChar { header, byte } if header.resource() == Resource::Blob => match header {
            Header::Location => redirect(tainted(&here, byte)),
            Header::RetryAfter => too_many(tainted("120", byte)),
            _ => Answer::Whole(
                head(
                    200,
                    &[
                        ("Content-Type", text("application/octet-stream")),
                        ("Content-Length", tainted(&bytes.len().to_string(), byte)),
                        ("Docker-Content-Digest", text(digest)),
                    ],
                ),
                bytes,
            ),
        },
        Behaviour::LengthOverstated(Resource::Blob)
        | Behaviour::LengthUnderstated(Resource::Blob)
        | Behaviour::Stall(Resource::Blob)
        | Behaviour::Trickle(Resource::Blob) => lying(&state.behaviour, "application/octet-stream", bytes, digest),
        _ => ok("application/octet-stream", bytes, Some(digest)),
    }
}
