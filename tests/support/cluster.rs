//! Several nodes on one machine, for cluster-mode tests (issue 14). Each node is a network
//! namespace with its own address, its own loopback, a real containerd and (on demand) the
//! real `pullcache serve` on its loopback at [`PULLCACHE_LISTEN`]. The upstream, the real
//! registry, has a namespace of its own behind a tbf-throttled link. All of them hang off a
//! bridge inside a "switch" namespace: nothing is added to the root namespace's interfaces or
//! routes.
//!
//! ```text
//!   pctest-<pid>-<run>-n0 (10.A.B.10) ──┐
//!   pctest-<pid>-<run>-n1 (10.A.B.11) ──┼── br0 in pctest-<pid>-<run>-sw
//!   pctest-<pid>-<run>-up (10.A.B.2)  ──┘   registry.test = http://10.A.B.2:5000
//! ```
//!
//! * Images are pushed to [`Cluster::push_url`], a second registry on the root namespace's
//!   loopback that serves the same storage: pushes stay out of the upstream's access log.
//! * containerd's hosts.toml names pullcache on the node's loopback as mirror and the
//!   upstream as server; pullcache maps `registry.test` to the upstream explicitly. No DNS.
//! * Dropping the cluster kills what it started, deletes its namespaces and its directory,
//!   also on a panic. [`Cluster::start`] first sweeps what runs that died left behind:
//!   namespaces and temp dirs named `pctest-<pid>-...` whose pid is gone.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::process::Child;

use super::binary::{self, Served};
use super::containerd::{self, Containerd};
use super::kill_and_reap;
use super::netns::{self, Link, Netns};
use super::registry::{Registry, RegistryOptions};

/// Every namespace and temp dir of a cluster is named `pctest-<pid>-<run>...`.
pub const PREFIX: &str = "pctest-";
/// The name the nodes pull the upstream by (`registry.test/name:tag`).
pub const REGISTRY_NAME: &str = "registry.test";
pub const REGISTRY_PORT: u16 = 5000;
/// pullcache's registry API, on each node's own loopback.
pub const PULLCACHE_LISTEN: &str = "127.0.0.1:5000";
pub const MBIT: u64 = 1_000_000;
const BRIDGE: &str = "br0";
const PREFIX_LEN: u8 = 24;
const REGISTRY_HOST: u8 = 2;
const FIRST_NODE_HOST: u8 = 10;
const PULLCACHE_LOG_FILTER: &str = "pullcache=debug";

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// The upstream link's rate both ways (tbf), or None for the veth's full speed.
    pub upstream_rate: Option<u64>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            upstream_rate: Some(100 * MBIT),
        }
    }
}

pub struct Cluster {
    name: String,
    /// `10.A.B.0/24`: the two middle octets.
    subnet: [u8; 2],
    nodes: Vec<Node>,
    upstream: Option<Upstream>,
    /// Every namespace made, the switch first.
    namespaces: Vec<Netns>,
    dir: TempDir,
}

struct Upstream {
    registry: Registry,
    staging: Registry,
    link: Link,
    netns: Netns,
    addr: Ipv4Addr,
}

impl Cluster {
    /// Sweeps leftovers of dead runs, then builds the switch, the upstream and `opts.nodes`
    /// nodes with containerd running (pullcache not yet: [`Node::start_pullcache`]).
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        netns::sweep_dead_runs(PREFIX)?;
        let (pid, run) = (std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
        let name = format!("{PREFIX}{pid}-{run}");
        // Unique per run, to tell runs apart in logs; the networks are apart anyway.
        let n = pid.wrapping_mul(64).wrapping_add(run);
        let dir = tempfile::Builder::new().prefix(&format!("{name}-")).tempdir()?;
        // Built up in place: if a step fails, dropping what is there cleans it up.
        let mut cluster = Cluster {
            name,
            subnet: [(n >> 8) as u8, n as u8],
            nodes: Vec::new(),
            upstream: None,
            namespaces: Vec::new(),
            dir,
        };
        let switch = cluster.add_netns("sw")?;
        netns::ip(&["-n", switch.name(), "link", "add", "name", BRIDGE, "type", "bridge"])?;
        netns::ip(&["-n", switch.name(), "link", "set", "dev", BRIDGE, "up"])?;
        cluster.upstream = Some(cluster.start_upstream(&switch, opts.upstream_rate).await?);
        for index in 0..opts.nodes {
            let node = cluster.start_node(&switch, index).await?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    fn add_netns(&mut self, suffix: &str) -> Result<Netns> {
        let netns = Netns::create(&format!("{}-{suffix}", self.name))?;
        self.namespaces.push(netns.clone());
        Ok(netns)
    }

    fn host(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet[0], self.subnet[1], host)
    }

    async fn start_upstream(&mut self, switch: &Netns, rate: Option<u64>) -> Result<Upstream> {
        let netns = self.add_netns("up")?;
        let addr = self.host(REGISTRY_HOST);
        let link = Link::connect(switch, BRIDGE, "upstream", &netns, addr, PREFIX_LEN)?;
        if let Some(rate) = rate {
            link.throttle(rate)?;
        }
        let storage = self.dir.path().join("registry");
        let staging_opts = RegistryOptions {
            dir_in: Some(self.dir.path().to_owned()),
            ..RegistryOptions::default()
        };
        let opts_netns = netns.clone();
        let opts = RegistryOptions {
            listen: Some(SocketAddr::from((addr, REGISTRY_PORT))),
            netns: Some(netns),
            ..staging_opts.clone()
        };
        let registry = Registry::start_with(opts, Some(storage.clone())).await?;
        // Outside any namespace: if this run dies, the sweep finds it by its config's path.
        let staging = Registry::start_with(staging_opts, Some(storage)).await?;
        Ok(Upstream {
            registry,
            staging,
            link,
            netns: opts_netns,
            addr,
        })
    }

    async fn start_node(&mut self, switch: &Netns, index: usize) -> Result<Node> {
        let netns = self.add_netns(&format!("n{index}"))?;
        let addr = self.host(FIRST_NODE_HOST + u8::try_from(index).context("too many nodes")?);
        let link = Link::connect(switch, BRIDGE, &format!("n{index}"), &netns, addr, PREFIX_LEN)?;
        let dir = self.dir.path().join(format!("n{index}"));
        let registry_url = self.registry().url();
        let mirror = format!("http://{PULLCACHE_LISTEN}");
        containerd::write_hosts_toml(&dir.join("hosts"), REGISTRY_NAME, &registry_url, &mirror);
        let containerd = Containerd::start_in(Some(netns.clone()), &dir).await?;
        Ok(Node {
            netns,
            addr,
            link,
            dir,
            registry_url,
            containerd,
            pullcache: Mutex::new(None),
        })
    }

    fn upstream(&self) -> &Upstream {
        self.upstream.as_ref().expect("the upstream starts with the cluster")
    }

    /// The upstream registry in its namespace: its `url()` is as the nodes reach it, and its
    /// access log shows what they fetched (with each node's address as `remote`).
    pub fn registry(&self) -> &Registry {
        &self.upstream().registry
    }

    /// Where to push images from the test (a loopback registry on the same storage).
    pub fn push_url(&self) -> String {
        self.upstream().staging.url()
    }

    pub fn upstream_link(&self) -> &Link {
        &self.upstream().link
    }

    /// Starts a real DNS server (dnsmasq) beside the upstream, answering from a hosts file
    /// only, with TTL 0, and points every node's resolver at it. A name under `cluster.test`
    /// it does not list is NXDOMAIN, as cluster DNS answers for a Service with no ready pod.
    /// Call it before starting pullcache on the nodes.
    pub async fn start_dns(&self) -> Result<Dns> {
        let upstream = self.upstream();
        let hosts = self.dir.path().join("dns-hosts");
        // Answered from the start (a SIGHUP before dnsmasq handles it would kill it).
        std::fs::write(&hosts, format!("{} ready.cluster.test\n", upstream.addr))?;
        let mut cmd = upstream.netns.command("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            // Authoritative for the domain: NXDOMAIN, not REFUSED, for a name it does not list.
            "--local=/cluster.test/",
        ])
        .arg(format!("--listen-address={}", upstream.addr))
        .args([
            "--bind-interfaces",
            "--port=53",
            "--local-ttl=0",
            "--neg-ttl=0",
            "--user=root",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--pid-file={}", self.dir.path().join("dnsmasq.pid").display()))
        .arg(format!(
            "--log-facility={}",
            self.dir.path().join("dnsmasq.log").display()
        ))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        let child = cmd.spawn().context("starting dnsmasq (Debian dnsmasq-base)")?;
        for node in &self.nodes {
            node.netns.set_resolver(upstream.addr)?;
        }
        let dns = Dns { child, hosts };
        // Ready once it answers.
        let probe = self.nodes.first().context("no node")?;
        super::eventually(Duration::from_secs(10), "dnsmasq to answer", || async {
            let out = probe
                .netns
                .output(&["getent", "hosts", "ready.cluster.test"], Duration::from_secs(5))
                .await?;
            Ok(out.status.success())
        })
        .await?;
        Ok(dns)
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// `pctest-<pid>-<run>`: what all its namespaces' names start with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every namespace, the switch's first.
    pub fn namespaces(&self) -> &[Netns] {
        &self.namespaces
    }

    /// Every process the cluster runs: all in its namespaces, and the staging registry.
    pub fn pids(&self) -> Vec<u32> {
        let inside = self.namespaces.iter().flat_map(Netns::pids);
        inside
            .chain(self.upstream.as_ref().and_then(|u| u.staging.pid()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first (each reaped by its own Drop), then whatever else is inside a
        // namespace, then the namespaces; the directory goes last, with the field.
        self.nodes.clear();
        self.upstream = None;
        for netns in self.namespaces.iter().rev() {
            netns.delete();
        }
    }
}

/// dnsmasq beside the upstream: the names it answers are set with [`Dns::set`].
/// `serve`'s cluster flags for a member at `peer` that finds the others by resolving `name`
/// (dnsmasq's) every `refresh`, with the cluster CA in `ca_dir`.
pub fn member_args(peer: SocketAddr, ca_dir: &Path, name: &str, refresh: Duration) -> Vec<String> {
    vec![
        "--peer-listen".to_owned(),
        peer.to_string(),
        "--peer-ca-dir".to_owned(),
        ca_dir.display().to_string(),
        "--peer".to_owned(),
        format!("{name}:{}", peer.port()),
        "--peer-refresh".to_owned(),
        format!("{}ms", refresh.as_millis()),
    ]
}

pub struct Dns {
    child: Child,
    hosts: PathBuf,
}

impl Dns {
    /// Makes `name` resolve to `addrs` (and nothing when empty), at once: dnsmasq reads its
    /// hosts file again on SIGHUP.
    pub fn set(&self, name: &str, addrs: &[Ipv4Addr]) -> Result<()> {
        let mut text = std::fs::read_to_string(&self.hosts)?
            .lines()
            .filter(|line| line.split_whitespace().nth(1) != Some(name))
            .map(|line| format!("{line}\n"))
            .collect::<String>();
        for addr in addrs {
            text.push_str(&format!("{addr} {name}\n"));
        }
        std::fs::write(&self.hosts, text)?;
        let pid = self.child.id().context("dnsmasq exited")?;
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -HUP dnsmasq");
        Ok(())
    }
}

/// One node: a namespace with its address, containerd, and pullcache when started.
pub struct Node {
    netns: Netns,
    addr: Ipv4Addr,
    link: Link,
    dir: PathBuf,
    registry_url: String,
    containerd: Containerd,
    pullcache: Mutex<Option<RunningPullcache>>,
}

struct RunningPullcache {
    child: Child,
    metrics_addr: String,
}

impl Node {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Its address on the bridge (where peers reach it).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }

    /// Its files: `hosts/` (containerd's hosts dir), `cache/` and `pullcache.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `pullcache serve` inside the node on [`PULLCACHE_LISTEN`] with its cache in
    /// `cache/`, `--upstream registry.test=<upstream>` and `extra_args`, and waits until it is
    /// ready. Its logs (JSON) go to `pullcache.log`. Again after [`Node::kill_pullcache`], on
    /// the same cache.
    pub async fn start_pullcache<S: Into<OsString>>(&self, extra_args: impl IntoIterator<Item = S>) -> Result<()> {
        if self.pullcache_pid().is_some() {
            bail!("pullcache already runs in {}", self.netns.name());
        }
        let mut args: Vec<OsString> = vec![
            "--cache-dir".into(),
            self.dir.join("cache").into(),
            "--upstream".into(),
            format!("{REGISTRY_NAME}={}", self.registry_url).into(),
        ];
        args.extend(extra_args.into_iter().map(Into::into));
        let served = binary::serve_in(Some(&self.netns), PULLCACHE_LISTEN, args, PULLCACHE_LOG_FILTER).await?;
        let log = self.dir.join("pullcache.log");
        let running = log_to_file(served, &log).await?;
        *self.pullcache.lock().unwrap() = Some(running);
        Ok(())
    }

    /// pullcache's registry API as seen from inside the node.
    pub fn pullcache_url(&self) -> String {
        format!("http://{PULLCACHE_LISTEN}")
    }

    /// Its `/metrics` as seen from inside the node, while it runs.
    pub fn pullcache_metrics_url(&self) -> Option<String> {
        let running = self.pullcache.lock().unwrap();
        running.as_ref().map(|r| format!("http://{}/metrics", r.metrics_addr))
    }

    pub fn pullcache_pid(&self) -> Option<u32> {
        self.pullcache.lock().unwrap().as_ref().and_then(|r| r.child.id())
    }

    /// `kill -9` pullcache and wait for it to be gone.
    pub async fn kill_pullcache(&self) -> Result<()> {
        let running = self.pullcache.lock().unwrap().take();
        let mut child = running.context("pullcache does not run")?.child;
        child.start_kill()?;
        tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
        Ok(())
    }

    /// One series (`name` or `name{labels}`) of pullcache's `/metrics`, read from inside the
    /// node; 0 when absent, as counters start.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let url = self.pullcache_metrics_url().context("pullcache does not run")?;
        let out = self.netns.output(&["curl", "-s", &url], Duration::from_secs(5)).await?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// Waits until its pullcache, if it runs, has no blob download in flight (see
    /// [`Pullcache::idle`](super::pullcache::Pullcache::idle)).
    pub async fn idle(&self) -> Result<()> {
        if self.pullcache_pid().is_none() {
            return Ok(());
        }
        super::eventually(
            super::pullcache::IDLE_TIMEOUT,
            format_args!("no blob download in flight in {}", self.netns.name()),
            || async { Ok(self.metric("pullcache_inflight_fetches").await? == 0.0) },
        )
        .await
    }

    /// Everything pullcache logged so far, across restarts.
    pub fn pullcache_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pullcache.log")).unwrap_or_default()
    }

    /// `ctr images pull` inside the node through its hosts dir: pullcache as mirror, the
    /// upstream as server (containerd falls through to it when pullcache fails).
    pub async fn pull(&self, image_ref: &str) -> Result<Output> {
        self.containerd.pull(image_ref, &self.dir.join("hosts")).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut running) = self.pullcache.get_mut().unwrap().take() {
            kill_and_reap(&mut running.child, Duration::from_secs(2));
        }
    }
}

/// Keeps pullcache's pipes drained into `path` (appended to), so it never blocks on logging.
async fn log_to_file(served: Served, path: &Path) -> Result<RunningPullcache> {
    use tokio::io::AsyncWriteExt;
    served.wait_ready().await?;
    let Served {
        mut child,
        metrics_addr,
        mut stdout,
        logs,
        ..
    } = served;
    let open = || std::fs::OpenOptions::new().create(true).append(true).open(path);
    let mut out = tokio::fs::File::from_std(open()?);
    let mut err = tokio::fs::File::from_std(open()?);
    out.write_all(logs.as_bytes()).await?;
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            let _ = out.write_all(format!("{line}\n").as_bytes()).await;
        }
    });
    if let Some(mut stderr) = child.stderr.take() {
        tokio::spawn(async move { tokio::io::copy(&mut stderr, &mut err).await });
    }
    Ok(RunningPullcache { child, metrics_addr })
}
