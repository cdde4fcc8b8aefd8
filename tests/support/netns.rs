//! Network namespaces (`ip netns`, Debian iproute2) as places to run the real programs, and
//! veth links between them that can be cut or throttled with `tc tbf`. Needs root: without it
//! the tests fail rather than skip.
//!
//! Facts this relies on (iproute2 6.1, kernel with veth, bridge and sch_tbf built in):
//! * `ip netns exec NS PROG` execs PROG in place (no fork), so the child's pid and a kill of it
//!   are PROG's own. It also enters a new mount namespace with /sys remounted; /tmp is shared,
//!   so a unix socket made inside (containerd's) is usable from outside.
//! * `ip -n A link add P type veth peer name D netns B` creates both ends inside namespaces:
//!   nothing ever appears in the root namespace.
//! * A namespace with processes still in it outlives `ip netns del` (only its name goes), so
//!   [`Netns::delete`] kills what is inside first.
//! * tbf shapes egress only; a [`Link`] is shaped at both of its ends.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::Command;

use super::containerd::{captured, output_within, without_proxy};
use super::{check_status, eventually_blocking};

pub const IP_BIN: &str = "ip";
pub const TC_BIN: &str = "tc";
pub const CURL_BIN: &str = "curl";
/// A link's device inside the namespace it connects.
pub const LINK_DEVICE: &str = "eth0";
/// tbf bucket, in bytes: above the 64 KiB of a veth GSO packet, so big segments pass whole.
/// A transfer can take this much less time than its size over the rate.
pub const TBF_BURST: usize = 96 * 1024;
/// tbf queue, as the delay a packet may wait before it is dropped.
const TBF_LATENCY: &str = "50ms";

/// A network namespace by name. Cloning copies the name only: whoever created it deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

/// One GET as curl saw it from inside a namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fetched {
    pub status: u16,
    /// Body bytes received.
    pub bytes: u64,
    /// From the start of the request to the last byte.
    pub took: Duration,
}

impl Netns {
    /// Limits everything sent on this namespace's loopback device to `bits_per_second` with
    /// tbf: every process inside then shares one slow link.
    pub fn throttle_loopback(&self, bits_per_second: u64) -> Result<()> {
        let (rate, burst) = (format!("{bits_per_second}bit"), TBF_BURST.to_string());
        let tbf = ["tbf", "rate", &rate, "burst", &burst, "latency", TBF_LATENCY];
        tc(&[&["-n", self.name(), "qdisc", "replace", "dev", "lo", "root"], &tbf[..]].concat())
    }

    /// `ip netns add NAME`, with its loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name]).context("creating a network namespace (needs root and iproute2)")?;
        let netns = Netns { name: name.to_owned() };
        if let Err(e) = ip(&["-n", name, "link", "set", "dev", "lo", "up"]) {
            netns.delete();
            return Err(e);
        }
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME PROGRAM`: add its arguments, as for [`Command::new`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(IP_BIN);
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside, killed after `timeout`; its output whatever the exit status.
    pub async fn output(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let (program, rest) = args.split_first().context("no command")?;
        let mut cmd = self.command(program);
        captured(cmd.args(rest));
        output_within(cmd, &format!("{} in {}", args.join(" "), self.name), timeout).await
    }

    /// GETs `url` with curl from inside (no proxy; TLS unverified, as a probe), within
    /// `timeout`. Err when no answer came: refused, unreachable or too slow.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<Fetched> {
        curl_get(Some(self), url, timeout).await
    }

    /// The status of a GET of `url` from inside, or None when nothing answered within 2 s.
    pub async fn http_status(&self, url: &str) -> Option<u16> {
        self.get(url, Duration::from_secs(2)).await.ok().map(|f| f.status)
    }

    /// Every process inside (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        std::process::Command::new(IP_BIN)
            .args(["netns", "pids", &self.name])
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Gives processes started inside from now on `nameserver` as their DNS server:
    /// `ip netns exec` mounts `/etc/netns/NAME/resolv.conf` over `/etc/resolv.conf`.
    pub fn set_resolver(&self, nameserver: Ipv4Addr) -> Result<()> {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\noptions timeout:1 attempts:1\n"),
        )?;
        Ok(())
    }

    /// `/etc/netns/NAME`, what `ip netns exec` mounts over `/etc` files.
    fn etc_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/etc/netns").join(&self.name)
    }

    /// Kills every process inside (SIGKILL), waits up to 5 s for them to go, and deletes the
    /// namespace and its `/etc/netns` files. Never fails: it is called from `Drop`.
    pub fn delete(&self) {
        kill_all(&self.pids());
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("{e:#}");
        }
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// `program` run inside `netns`, or here when there is none.
pub fn command_in(netns: Option<&Netns>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        Some(netns) => netns.command(program),
        None => Command::new(program),
    }
}

/// GETs `url` with curl inside `netns`, or here when there is none (no proxy; TLS unverified,
/// as a probe), within `timeout`. Err when no answer came: refused, unreachable or too slow.
pub async fn curl_get(netns: Option<&Netns>, url: &str, timeout: Duration) -> Result<Fetched> {
    let max_time = format!("{:.3}", timeout.as_secs_f64());
    let mut cmd = command_in(netns, CURL_BIN);
    cmd.args(["-sS", "-k", "--noproxy", "*", "-o", "/dev/null"]).args([
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        "--max-time",
        &max_time,
        url,
    ]);
    without_proxy(captured(&mut cmd));
    let what = match netns {
        Some(netns) => format!("curl {url} in {}", netns.name),
        None => format!("curl {url}"),
    };
    let out = output_within(cmd, &what, timeout + Duration::from_secs(5)).await?;
    let out = check_status(&what, out)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let mut next = || fields.next().with_context(|| format!("{what}: cannot parse {text:?}"));
    let status = next()?.parse()?;
    let bytes = next()?.parse()?;
    let took = Duration::from_secs_f64(next()?.parse()?);
    Ok(Fetched { status, bytes, took })
}

/// A veth pair from a port on the switch's bridge to [`LINK_DEVICE`] in another namespace.
#[derive(Debug, Clone)]
pub struct Link {
    switch: Netns,
    port: String,
    end: Netns,
}

impl Link {
    /// Connects `end` to `bridge` in `switch` through the new port `port`, and gives its end
    /// `addr/prefix`.
    pub fn connect(switch: &Netns, bridge: &str, port: &str, end: &Netns, addr: Ipv4Addr, prefix: u8) -> Result<Link> {
        let sw = switch.name();
        ip(&[
            "-n",
            sw,
            "link",
            "add",
            "name",
            port,
            "type",
            "veth",
            "peer",
            "name",
            LINK_DEVICE,
            "netns",
            end.name(),
        ])?;
        ip(&["-n", sw, "link", "set", "dev", port, "master", bridge, "up"])?;
        let cidr = format!("{addr}/{prefix}");
        ip(&["-n", end.name(), "addr", "add", &cidr, "dev", LINK_DEVICE])?;
        ip(&["-n", end.name(), "link", "set", "dev", LINK_DEVICE, "up"])?;
        Ok(Link {
            switch: switch.clone(),
            port: port.to_owned(),
            end: end.clone(),
        })
    }

    /// Cuts the link at the switch, as a pulled cable: the end keeps its address and routes
    /// but loses carrier, and whatever it sends is lost.
    pub fn down(&self) -> Result<()> {
        ip(&["-n", self.switch.name(), "link", "set", "dev", &self.port, "down"])
    }

    /// Restores a link cut with [`Link::down`], and returns once its end has carrier again,
    /// with its ARP entries flushed: those being resolved during the cut would otherwise fail
    /// new connections for up to a second after. (Another namespace that tried to reach the
    /// end during the cut may see that second.)
    pub fn up(&self) -> Result<()> {
        ip(&["-n", self.switch.name(), "link", "set", "dev", &self.port, "up"])?;
        let show = ["-n", self.end.name(), "-o", "link", "show", "dev", LINK_DEVICE];
        eventually_blocking(
            Duration::from_secs(5),
            format_args!("carrier on {} after up", self.end.name()),
            || Ok(ip_output(&show)?.contains("state UP")),
        )?;
        ip(&["-n", self.end.name(), "neigh", "flush", "dev", LINK_DEVICE])
    }

    /// Limits both directions to `bits_per_second` with tbf (replacing any earlier limit).
    pub fn throttle(&self, bits_per_second: u64) -> Result<()> {
        let (rate, burst) = (format!("{bits_per_second}bit"), TBF_BURST.to_string());
        let tbf = ["tbf", "rate", &rate, "burst", &burst, "latency", TBF_LATENCY];
        for (netns, dev) in self.ends() {
            tc(&[&["-n", netns, "qdisc", "replace", "dev", dev, "root"], &tbf[..]].concat())?;
        }
        Ok(())
    }

    /// Lifts a [`Link::throttle`].
    pub fn unthrottle(&self) -> Result<()> {
        for (netns, dev) in self.ends() {
            tc(&["-n", netns, "qdisc", "del", "dev", dev, "root"])?;
        }
        Ok(())
    }

    fn ends(&self) -> [(&str, &str); 2] {
        [(self.switch.name(), self.port.as_str()), (self.end.name(), LINK_DEVICE)]
    }
}

/// Runs `ip ARGS`; Err with its stderr when it fails.
pub fn ip(args: &[&str]) -> Result<()> {
    run_sync(IP_BIN, args).map(drop)
}

/// What `ip ARGS` prints; Err with its stderr when it fails.
pub fn ip_output(args: &[&str]) -> Result<String> {
    Ok(String::from_utf8(run_sync(IP_BIN, args)?.stdout)?)
}

fn tc(args: &[&str]) -> Result<()> {
    run_sync(TC_BIN, args).map(drop)
}

fn run_sync(program: &str, args: &[&str]) -> Result<Output> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed?)"))?;
    check_status(&format!("{program} {}", args.join(" ")), out)
}

/// Every network namespace's name (`ip netns list`).
pub fn list() -> Result<Vec<String>> {
    // `NAME` or `NAME (id: N)`.
    Ok(ip_output(&["netns", "list"])?
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// `kill -9` each of `pids`, and waits up to 5 s for them to be gone.
fn kill_all(pids: &[u32]) {
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    // Never fails (for `Drop`): whatever still lives after 5 s is left to the caller's error.
    let _ = eventually_blocking(Duration::from_secs(5), "killed processes to exit", || {
        !pids.iter().any(|&pid| is_alive(pid))
    });
}

/// The processes whose command line names something under `dir`.
fn processes_using(dir: &Path) -> Vec<u32> {
    let dir = dir.as_os_str().as_encoded_bytes();
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    procs
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.windows(dir.len()).any(|window| window == dir)
        })
        .collect()
}

/// Whether a process exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `PID (COMM) STATE ...`; COMM may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The pid in a name `PREFIX<pid>-...` when that process is gone: a leftover of a crashed run.
pub fn dead_owner(name: &str, prefix: &str) -> Option<u32> {
    let pid = name.strip_prefix(prefix)?.split('-').next()?.parse().ok()?;
    (!is_alive(pid)).then_some(pid)
}

/// Deletes the namespaces `PREFIX<pid>-...` of runs whose process is gone, and their
/// directories `PREFIX<pid>-...` in the temp dir, killing what still runs inside the one or
/// from the other. Under [`sweep_lock`].
pub fn sweep_dead_runs(prefix: &str) -> Result<()> {
    let _lock = sweep_lock()?;
    for name in list()? {
        if dead_owner(&name, prefix).is_some() {
            eprintln!("removing network namespace {name}, left by a run that died");
            Netns { name }.delete();
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead_owner(&name, prefix).is_some() {
            eprintln!("removing {}, left by a run that died", entry.path().display());
            kill_all(&processes_using(&entry.path()));
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// An exclusive lock (flock) on a file in the temp dir, which every sweep takes: while it is
/// held, no sweep in this or another test process runs, e.g. on a fake leftover half-made.
pub struct SweepLock {
    _file: std::fs::File,
}

pub fn sweep_lock() -> Result<SweepLock> {
    let path = std::env::temp_dir().join("pctest.sweep.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(SweepLock { _file: file })
}
