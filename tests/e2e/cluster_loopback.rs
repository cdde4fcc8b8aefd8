//! Cluster mode on one loopback: several pullcache members in this process, each with its own
//! cache and peer port, the real registry upstream. Quick checks of ownership, streaming,
//! failover and the peer port's mutual TLS; the tests in network namespaces with real
//! containerd are in `cluster.rs`.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use pullcache::oci::{Digest, Registry as RegistryName};
use pullcache::peers::ring;
use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{PushedImage, push_oci_image};
use support::pullcache::Pullcache;
use support::registry::Registry;

const REGISTRY: &str = "registry.test";

struct Cluster {
    _dir: tempfile::TempDir,
    upstream: Registry,
    image: PushedImage,
    members: Vec<Option<Pullcache>>,
    peer_addrs: Vec<std::net::SocketAddr>,
}

async fn cluster(n: usize, layers: &[usize]) -> anyhow::Result<Cluster> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", layers).await?;
    let url = upstream.url();
    let (dir, members, peer_addrs) = members(n, &url, 4).await?;
    Ok(Cluster {
        _dir: dir,
        upstream,
        image,
        members,
        peer_addrs,
    })
}

type Members = (tempfile::TempDir, Vec<Option<Pullcache>>, Vec<std::net::SocketAddr>);

/// `n` members fetching `registry.test` from `upstream`, with `max_uploads` per blob.
async fn members(n: usize, upstream: &str, max_uploads: usize) -> anyhow::Result<Members> {
    members_with(n, upstream, max_uploads, |_| {}).await
}

/// [`members`], each config changed by `configure` first.
async fn members_with(
    n: usize,
    upstream: &str,
    max_uploads: usize,
    configure: impl Fn(&mut pullcache::Config),
) -> anyhow::Result<Members> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("cluster-ca");
    pullcache::ca::init(&ca)?;
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let peer_addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut members = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let mut config = support::pullcache::config(dir.path().join(format!("cache-{i}")));
        config.registry(RegistryName::parse(REGISTRY)?).url = Some(upstream.parse()?);
        config.peers = Some(pullcache::peers::Settings {
            listen: peer_addrs[i],
            targets: peer_addrs.iter().map(ToString::to_string).collect(),
            ca_dir: ca.clone(),
            max_uploads,
            refresh: Duration::from_secs(1),
        });
        configure(&mut config);
        members.push(Some(Pullcache::start_member(config, listener).await?));
    }
    Ok((dir, members, peer_addrs))
}

impl Cluster {
    fn member(&self, i: usize) -> &Pullcache {
        self.members[i].as_ref().expect("member running")
    }

    /// The member that owns `digest`.
    fn owner(&self, digest: &str) -> usize {
        let digest: Digest = digest.parse().unwrap();
        let owner = ring::rank(&self.peer_addrs, &digest)[0];
        self.peer_addrs.iter().position(|a| *a == owner).unwrap()
    }

    async fn get_blob(&self, i: usize, digest: &str) -> anyhow::Result<(u16, bytes::Bytes)> {
        let url = format!("{}/v2/team/app/blobs/{digest}?ns={REGISTRY}", self.member(i).url());
        let resp = support::http_client().get(url).send().await?;
        Ok((resp.status().as_u16(), resp.bytes().await?))
    }
}

/// Every member asks for every blob at once: one upstream GET per blob for the cluster, and
/// each member keeps its own verified copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_get_per_blob_for_the_cluster() -> anyhow::Result<()> {
    let c = cluster(4, &[3 << 20, 1 << 20]).await?;
    let blobs: Vec<_> = c.image.layers().iter().map(|b| (b.digest.clone(), b.size)).collect();
    let mut pulls = Vec::new();
    for (digest, _) in &blobs {
        for i in 0..4 {
            pulls.push(c.get_blob(i, digest));
        }
    }
    for ((status, body), (digest, size)) in futures_util::future::join_all(pulls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .zip(blobs.iter().flat_map(|b| std::iter::repeat_n(b, 4)))
    {
        assert_eq!(status, 200, "{digest}");
        assert_eq!(body.len() as u64, *size);
        assert_eq!(support::images::sha256_digest(&body), *digest);
    }
    for (digest, _) in &blobs {
        let gets = c
            .upstream
            .wait_access_log_count("GET", digest, 1, Duration::from_secs(5))
            .await;
        assert_eq!(gets, 1, "upstream GETs of {digest} (owner: member {})", c.owner(digest));
        for i in 0..4 {
            assert!(
                c.member(i).stored_blobs().contains(digest),
                "member {i} kept no copy of {digest}"
            );
        }
    }
    Ok(())
}

/// With the owner gone, the others fall back (to the next peer, then upstream) within a pull;
/// a stopped owner's port is refused at once, so nothing waits for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_is_skipped() -> anyhow::Result<()> {
    let mut c = cluster(3, &[1 << 20]).await?;
    let digest = c.image.layers()[0].digest.clone();
    let owner = c.owner(&digest);
    c.members[owner].take().unwrap().stop().await?;
    let asker = (owner + 1) % 3;
    let started = std::time::Instant::now();
    let (status, body) = c.get_blob(asker, &digest).await?;
    assert_eq!(status, 200);
    assert_eq!(support::images::sha256_digest(&body), digest);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // It did ask the dead owner first (so this is a failover, not a node ignoring its peers),
    // and one upstream GET served it.
    let tried = c
        .member(asker)
        .sample("pullcache_peer_fetches_total{result=\"unavailable\"}")
        .await?;
    assert!(tried >= 1.0, "the asker never tried the owner");
    let gets = c
        .upstream
        .wait_access_log_count("GET", &digest, 1, Duration::from_secs(5))
        .await;
    assert_eq!(gets, 1);
    Ok(())
}

/// The peer port is for cluster members only: a client without a certificate from the cluster
/// CA reads nothing, over TLS or plain HTTP, and tags are never served there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_wants_a_cluster_certificate() -> anyhow::Result<()> {
    let c = cluster(2, &[64 << 10]).await?;
    let digest = c.image.layers()[0].digest.clone();
    // Warm member 0, so the blob is there to steal.
    assert_eq!(c.get_blob(0, &digest).await?.0, 200);
    let peer = c.peer_addrs[0];
    let path = format!("/v2/team/app/blobs/{digest}?ns={REGISTRY}");

    // Plain HTTP: the TLS listener reads no request.
    let plain = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let answer = support::raw_exchange(peer, plain.as_bytes()).await;
    assert!(
        answer.as_ref().map_or(true, |(status, _, _)| *status != 200),
        "{answer:?}"
    );

    // TLS without a client certificate, even trusting the right CA: the handshake fails and
    // no byte of an answer comes back.
    let ca = c._dir.path().join("cluster-ca").join(pullcache::ca::CERT_FILE);
    let connector = support::tls::connector_trusting(&ca)?;
    let tcp = tokio::net::TcpStream::connect(peer).await?;
    let name = rustls_pki_types::ServerName::IpAddress(peer.ip().into());
    let read = async {
        let mut stream = connector.connect(name, tcp).await?;
        stream.write_all(plain.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await? {
        Err(e) => assert!(e.to_string().contains("CertificateRequired"), "{e:#}"),
        Ok(answer) => assert!(answer.is_empty(), "answered: {}", String::from_utf8_lossy(&answer)),
    }

    // A client with a certificate from the cluster CA is served the same request: the
    // refusals above are about the certificate, not a port that serves nobody.
    let ca_dir = c._dir.path().join("cluster-ca");
    let identity = pullcache::peers::tls::Identity::issue(&ca_dir, peer.ip())?;
    let member = tokio_rustls::TlsConnector::from(Arc::new(identity.client_config()));
    let tcp = tokio::net::TcpStream::connect(peer).await?;
    let name = rustls_pki_types::ServerName::IpAddress(peer.ip().into());
    let mut stream = member.connect(name, tcp).await?;
    stream.write_all(plain.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await??;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "a member was refused: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    // Tags are not served there, even to members.
    let tag = format!("GET /v2/team/app/manifests/v1?ns={REGISTRY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let tcp = tokio::net::TcpStream::connect(peer).await?;
    let mut stream = member
        .connect(rustls_pki_types::ServerName::IpAddress(peer.ip().into()), tcp)
        .await?;
    stream.write_all(tag.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await??;
    assert!(
        answer.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}

/// A blob wanted by every member at once, from an owner that may upload it to one peer at a
/// time: the others are sent to peers receiving it, which stream it on. Every member gets it
/// whole, the owner sends it at most twice, and the upstream is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_blob_spreads_as_a_tree() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let blob = support::images::random_bytes(2 << 20);
    let digest = support::images::sha256_digest(&blob);
    let path = format!("/v2/team/app/blobs/{digest}");
    // Slow enough that every member asks while the owner is still downloading.
    upstream.set(
        &path,
        Reply::ok(blob.clone(), &[]).slowly(20, Duration::from_millis(50)),
    );
    let n = 6;
    let (_dir, members, peer_addrs) = members(n, &upstream.url(), 1).await?;
    let owner_addr = ring::rank(&peer_addrs, &digest.parse()?)[0];
    let owner = peer_addrs.iter().position(|a| *a == owner_addr).unwrap();
    let client = support::http_client();
    let pulls = (0..n).filter(|i| *i != owner).map(|i| {
        let url = format!("{}{path}?ns={REGISTRY}", members[i].as_ref().unwrap().url());
        let client = client.clone();
        async move {
            let resp = client.get(url).send().await?;
            anyhow::ensure!(resp.status() == 200, "member {i}: {}", resp.status());
            anyhow::Ok(resp.bytes().await?)
        }
    });
    for body in futures_util::future::join_all(pulls).await {
        assert!(body? == blob, "a member got other bytes");
    }
    assert_eq!(upstream.hits(&path), 1, "upstream GETs");
    let member = |i: usize| members[i].as_ref().unwrap();
    let sent = member(owner)
        .sample("pullcache_peer_bytes_total{direction=\"out\"}")
        .await?;
    assert!(
        sent <= 2.0 * blob.len() as f64,
        "the owner sent {sent} bytes of a {}-byte blob with --peer-max-uploads 1",
        blob.len()
    );
    let mut redirected = 0.0;
    let mut most = 0.0f64;
    for i in 0..n {
        redirected += member(i)
            .sample("pullcache_peer_requests_total{result=\"redirected\"}")
            .await?;
        most = most.max(
            member(i)
                .sample("pullcache_peer_bytes_total{direction=\"out\"}")
                .await?,
        );
    }
    assert!(redirected > 0.0, "no asker was sent on to another peer");
    assert!(most <= 2.0 * blob.len() as f64, "a member sent {most} bytes");
    Ok(())
}

/// A cluster member (it holds a certificate from the cluster CA) that answers every blob
/// request with the right length of the wrong bytes.
async fn forger(ca: &std::path::Path) -> anyhow::Result<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let identity = pullcache::peers::tls::Identity::issue(ca, listener.local_addr()?.ip())?;
    Ok((listener, Arc::new(identity.server_config()?)))
}

fn serve_forgeries(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, size: usize) {
    use hyper::service::service_fn;
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = service_fn(move |_req| async move {
                    let body = http_body_util::Full::new(bytes::Bytes::from(vec![b'X'; size]));
                    // As a real peer would, and claiming the bytes public besides: neither
                    // gets a forged byte stored.
                    let mut resp = hyper::Response::new(body);
                    resp.headers_mut().insert(
                        pullcache::peers::VISIBILITY_HEADER,
                        http::HeaderValue::from_static("public"),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

/// A peer that serves forged bytes is a bad upstream: the transfer fails before its last
/// byte, nothing is stored, the peer is skipped and counted, and the next request is served
/// from the upstream (the digest itself is not refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forging_peer_is_skipped_and_nothing_forged_is_stored() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("cluster-ca");
    pullcache::ca::init(&ca)?;
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", &[256 << 10]).await?;
    let layer = image.layers()[0].clone();
    let (forger_listener, tls) = forger(&ca).await?;
    let forger_addr = forger_listener.local_addr()?;
    serve_forgeries(forger_listener, tls, layer.size as usize);
    // A member whose peer port makes the forger the layer's owner.
    let digest: Digest = layer.digest.parse()?;
    let (listener, me) = loop {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let me = listener.local_addr()?;
        if ring::rank(&[forger_addr, me], &digest)[0] == forger_addr {
            break (listener, me);
        }
    };
    let mut config = support::pullcache::config(dir.path().join("cache"));
    config.registry(RegistryName::parse(REGISTRY)?).url = Some(upstream.url().parse()?);
    config.peers = Some(pullcache::peers::Settings {
        listen: me,
        targets: vec![forger_addr.to_string()],
        ca_dir: ca,
        max_uploads: 4,
        refresh: Duration::from_secs(60),
    });
    let member = Pullcache::start_member(config, listener).await?;
    // Discovery's first round runs at start, in its own task; the view's size in /metrics
    // says when the forger is in it (a request would be no probe: it would spend the test).
    support::eventually(Duration::from_secs(5), "the forger in the member's view", || async {
        anyhow::Ok(member.sample("pullcache_peer_view_size").await? == 2.0)
    })
    .await?;
    let url = format!("{}/v2/team/app/blobs/{}?ns={REGISTRY}", member.url(), layer.digest);

    let first = support::http_client().get(&url).send().await?;
    let forged = match first.status().as_u16() {
        200 => first.bytes().await.map(|b| b.to_vec()),
        status => anyhow::bail!("the first answer was {status}, not a stream from the forger"),
    };
    assert!(
        forged.as_ref().map_or(true, |b| b.len() < layer.size as usize),
        "a forged body was delivered whole"
    );
    assert_eq!(
        upstream.access_log_count("GET", &layer.digest),
        0,
        "the forger was not asked first"
    );
    assert!(member.stored_blobs().is_empty(), "forged bytes were stored");
    assert_eq!(member.sample("pullcache_peer_forged_total").await?, 1.0);

    let second = support::http_client().get(&url).send().await?;
    assert_eq!(second.status(), 200);
    assert_eq!(support::images::sha256_digest(&second.bytes().await?), layer.digest);
    assert_eq!(
        upstream
            .wait_access_log_count("GET", &layer.digest, 1, Duration::from_secs(5))
            .await,
        1
    );
    assert_eq!(member.stored_blobs(), vec![layer.digest.clone()]);
    Ok(())
}

/// A node checks its own client before it asks a peer: a private repository's blob, asked
/// for through a mirror with `private = bypass`, gets a 404 and no peer or upstream request,
/// although the node holds credentials that could read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_its_client_before_asking_a_peer() -> anyhow::Result<()> {
    use support::token_service::TokenService;
    let dir = tempfile::tempdir()?;
    let tokens = TokenService::start(&[("cache", "cache-pw")], true).await?;
    tokens.grant_only("cache", &["team/app"]);
    tokens.grant_only("", &[]);
    let (upstream, images) =
        support::registry::with_token_auth(dir.path(), &tokens, &[("team/app", "v1", &[128 * 1024])]).await?;
    let image = &images[0];
    // The same registry under a second name whose private images are shared: the positive
    // control, where the asker does go to the owner.
    const SHARED: &str = "shared.test";
    let url = upstream.url();
    let (_dir, members, peer_addrs) = members_with(2, &url, 4, |config| {
        for name in [REGISTRY, SHARED] {
            let settings = config.registry(RegistryName::parse(name).unwrap());
            settings.url = Some(url.parse().unwrap());
            settings.credentials = Some(pullcache::upstream::Credentials::Basic {
                username: "cache".to_owned(),
                password: "cache-pw".to_owned(),
            });
        }
        config.authorize.registries.insert(
            RegistryName::parse(SHARED).unwrap(),
            pullcache::authorize::PrivateImages::Share,
        );
    })
    .await?;
    let layer = &image.layers()[0].digest;
    let owner_addr = ring::rank(&peer_addrs, &layer.parse::<Digest>()?)[0];
    let owner = peer_addrs.iter().position(|a| *a == owner_addr).unwrap();
    let asker = members[1 - owner].as_ref().unwrap();
    let owner = members[owner].as_ref().unwrap();

    let url = format!("{}/v2/team/app/blobs/{layer}?ns={REGISTRY}", asker.url());
    let resp = support::http_client().get(url).send().await?;
    assert_eq!(
        resp.status(),
        404,
        "a private blob reached a client of a bypassing node"
    );
    assert_eq!(
        asker
            .sample("pullcache_authorizations_total{result=\"bypassed\"}")
            .await?,
        1.0
    );
    assert_eq!(
        owner.sum("pullcache_peer_requests_total").await?,
        0.0,
        "the owner was asked"
    );
    assert_eq!(
        asker.sum("pullcache_peer_fetches_total").await?,
        0.0,
        "a peer was asked"
    );
    assert_eq!(
        upstream.access_log_count("GET", layer),
        0,
        "the registry was asked for the blob"
    );
    // The owner itself, asked by its own client with the share policy off as well, refuses too.
    let url = format!("{}/v2/team/app/blobs/{layer}?ns={REGISTRY}", owner.url());
    assert_eq!(support::http_client().get(url).send().await?.status(), 404);

    // Shared, the same blob goes through the owner: the counters above could have moved.
    let url = format!("{}/v2/team/app/blobs/{layer}?ns={SHARED}", asker.url());
    let resp = support::http_client().get(url).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await?.len() as u64, image.layers()[0].size);
    assert!(
        owner.sum("pullcache_peer_requests_total").await? > 0.0,
        "the owner was never asked"
    );
    // One blob served upstream for the cluster (the token dance adds a refused first try).
    let served = upstream
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.path().ends_with(layer.as_str()) && e.status == 200)
        .count();
    assert_eq!(served, 1);
    Ok(())
}
