//! A market's LAN on one machine: one network namespace per tablet, joined by a bridge.
//!
//! Each test re-runs itself inside `unshare --net --mount` (a private network and mount namespace),
//! so every namespace, bridge and link it makes vanishes when it exits, even after a crash. Inside,
//! the test's own namespace is the "switch": bridge `br0` is the market Wi-Fi (10.99.0.0/24, where
//! the nodes' mesh runs and mDNS discovers peers); each node also has a point-to-point management
//! link (10.98.k.0/30) that carries only the test's HTTP calls, so a partition of the Wi-Fi never
//! cuts the test off from a node. A partition moves a node's Wi-Fi port to a second bridge.
//!
//! Without the privileges to make namespaces the tests say so loudly and skip; with CI=true they fail.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INNER: &str = "STALLMESH_IN_NETNS";
/// One world at a time: each starts several nodes, and the machine has 2 cores.
static ONE_WORLD: Mutex<()> = Mutex::new(());

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `body` inside a fresh network + mount namespace (re-executing this test there).
pub fn in_netns(test_name: &str, body: impl FnOnce()) {
    run_isolated(test_name, &["--exact", test_name, "--nocapture", "--test-threads", "1"], body)
}

/// The same for a benchmark binary (re-executed with `--bench`).
pub fn in_netns_bench(body: impl FnOnce()) {
    run_isolated("mesh benchmark", &["--bench"], body)
}

fn run_isolated(test_name: &str, args: &[&str], body: impl FnOnce()) {
    if std::env::var_os(INNER).is_some() {
        sh(&["mkdir", "-p", "/run/netns"]);
        sh(&["mount", "-t", "tmpfs", "none", "/run/netns"]);
        sh(&["ip", "link", "set", "lo", "up"]);
        body();
        return;
    }
    let _one = ONE_WORLD.lock().unwrap_or_else(|p| p.into_inner());
    let prefix: &[&str] = if probe(&[]) {
        &[]
    } else if probe(&["--user", "--map-root-user"]) {
        &["--user", "--map-root-user"]
    } else {
        let msg = format!(
            "SKIPPED {test_name}: cannot create network namespaces here (needs root, or unprivileged user \
             namespaces). These multi-process mesh tests did NOT run."
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg} Under CI=true they must run.");
        }
        skipped(&msg);
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(prefix)
        .args(["--net", "--mount", "--fork", "--kill-child", "--"])
        .arg(exe)
        .args(args)
        .env(INNER, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    // Through print!, so the test harness shows the inner run's output only when it matters.
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test_name} failed inside its network namespace ({})", out.status);
}

fn probe(prefix: &[&str]) -> bool {
    Command::new("unshare")
        .args(prefix)
        .args([
            "--net",
            "--mount",
            "--fork",
            "--",
            "sh",
            "-c",
            "mkdir -p /run/netns && mount -t tmpfs none /run/netns && ip link add probe0 type bridge",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `stallmesh` binary cargo built for this test run.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("stallmesh");
    assert!(bin.exists(), "{} missing: run `cargo test --workspace` (it builds the node binary)", bin.display());
    bin
}

pub struct Lan {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Option<NodeProc>>,
    /// Start nodes with staff sign-in as configured by default (asked for: they listen on the LAN).
    pub sign_in: bool,
}

pub struct NodeProc {
    pub k: usize,
    pub child: Child,
    pub url: String,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lan {
    /// Stops the nodes and removes the hosts and bridges, so another LAN can be built in the same
    /// namespace (the benchmark builds several).
    fn drop(&mut self) {
        for n in self.nodes.iter_mut() {
            n.take();
        }
        for k in 1..self.nodes.len() {
            let _ = Command::new("ip").args(["netns", "del", &ns(k)]).status();
            let _ = Command::new("ip").args(["link", "del", &format!("mgmt{k}")]).stderr(Stdio::null()).status();
        }
        for br in ["br0", "br1"] {
            let _ = Command::new("ip").args(["link", "del", br]).status();
        }
    }
}

pub fn ns(k: usize) -> String {
    format!("sm{k}")
}

impl Lan {
    /// `n` hosts on the market Wi-Fi, each with its management link; no nodes started yet.
    pub fn new(n: usize) -> Lan {
        for br in ["br0", "br1"] {
            sh(&["ip", "link", "add", br, "type", "bridge", "mcast_snooping", "0"]);
            sh(&["ip", "link", "set", br, "up"]);
        }
        for k in 1..=n {
            let h = ns(k);
            sh(&["ip", "netns", "add", &h]);
            sh(&["ip", "-n", &h, "link", "set", "lo", "up"]);
            sh(&["ip", "link", "add", &format!("wifi{k}"), "type", "veth", "peer", "name", "eth0", "netns", &h]);
            sh(&["ip", "link", "set", &format!("wifi{k}"), "master", "br0", "up"]);
            sh(&["ip", "-n", &h, "addr", "add", &format!("10.99.0.{k}/24"), "dev", "eth0"]);
            sh(&["ip", "-n", &h, "link", "set", "eth0", "up"]);
            sh(&["ip", "link", "add", &format!("mgmt{k}"), "type", "veth", "peer", "name", "mgmt", "netns", &h]);
            sh(&["ip", "addr", "add", &format!("10.98.{k}.2/30"), "dev", &format!("mgmt{k}")]);
            sh(&["ip", "link", "set", &format!("mgmt{k}"), "up"]);
            sh(&["ip", "-n", &h, "addr", "add", &format!("10.98.{k}.1/30"), "dev", "mgmt"]);
            sh(&["ip", "-n", &h, "link", "set", "mgmt", "up"]);
        }
        Lan { dir: tempfile::tempdir().unwrap(), nodes: (0..=n).map(|_| None).collect(), sign_in: false }
    }

    /// A market "A" with `n` enrolled tablets, all started with no addresses of each other.
    pub fn with_market(n: usize) -> Lan {
        let mut lan = Lan::new(n);
        lan.market("A");
        for k in 1..=n {
            let creds = lan.enrol(k, "A");
            lan.start(k, &creds);
        }
        lan
    }

    /// `stallmesh market init` for a market named `market` in this LAN's directory.
    pub fn market(&self, market: &str) {
        let out = Command::new(binary())
            .args(["market", "init", "--dir", market, "--name", market])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Enrols the device of host `k` in `market`.
    pub fn enrol(&self, k: usize, market: &str) -> PathBuf {
        let creds = format!("creds{k}");
        let out = Command::new(binary())
            .args(["device", "enroll", "--market", market, "--stall", "Stall", "--role", "organiser", "--out", &creds])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        self.dir.path().join(creds)
    }

    /// Starts (or restarts) the node of host `k` with the credentials in `creds`, no peer addresses.
    pub fn start(&mut self, k: usize, creds: &Path) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("node{k}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns(k)])
            .arg(binary())
            .args(["up", "--credentials"])
            .arg(creds)
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data{k}")))
            .args(["--http-addr", &format!("10.98.{k}.1:7878")])
            .env("STALLMESH_MESH_LISTEN", format!("/ip4/10.99.0.{k}/tcp/7001"))
            .env("RUST_LOG", "info,libp2p_mdns=warn")
            // The test calls the API from the "switch", not from the tablet itself: staff sign-in
            // is tested on its own (tests/page.rs), off elsewhere.
            .env("STALLMESH_STAFF_SIGN_IN", if self.sign_in { "auto" } else { "off" })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("http://10.98.{k}.1:7878");
        let node = NodeProc { k, child, url };
        eventually(Duration::from_secs(20), &format!("node {k} up"), || ureq::get(&format!("{}/healthz", node.url)).call().is_ok());
        self.nodes[k] = Some(node);
    }

    pub fn kill9(&mut self, k: usize) {
        if let Some(mut n) = self.nodes[k].take() {
            n.child.kill().unwrap();
            n.child.wait().unwrap();
        }
    }

    pub fn url(&self, k: usize) -> &str {
        &self.nodes[k].as_ref().expect("node running").url
    }

    /// Moves hosts `side` onto a Wi-Fi of their own: they reach each other, not the rest.
    pub fn partition(&self, side: &[usize]) {
        for k in side {
            sh(&["ip", "link", "set", &format!("wifi{k}"), "master", "br1"]);
        }
    }

    pub fn heal(&self, side: &[usize]) {
        for k in side {
            sh(&["ip", "link", "set", &format!("wifi{k}"), "master", "br0"]);
        }
    }

    pub fn log(&self, k: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{k}.log"))).unwrap_or_default()
    }

    pub fn get(&self, k: usize, path: &str) -> Value {
        get(self.url(k), path)
    }

    pub fn post(&self, k: usize, path: &str, body: &Value) -> (u16, Value) {
        post(self.url(k), path, body)
    }

    /// Connected peers with a verified enrolment, as node `k` sees them.
    pub fn peers(&self, k: usize) -> usize {
        self.get(k, "/api/v1/mesh")["peers"].as_array().map_or(0, Vec::len)
    }
}

pub fn get(base: &str, path: &str) -> Value {
    ureq::get(&format!("{base}{path}")).timeout(Duration::from_secs(5)).call().unwrap().into_json().unwrap()
}

pub fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    match ureq::post(&format!("{base}{path}")).timeout(Duration::from_secs(5)).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("POST {base}{path}: {e}"),
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`. Returns the time taken.
pub fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// First port handed out by [`free_port`]: below Linux's ephemeral range (32768–60999 by default), so
/// no outgoing connection of a node (a dial to a peer that is not up yet, say) can take a port a test
/// reserved for a node that starts later. Asking the kernel for port 0 instead hands out exactly the
/// ports those dials use, which made a node fail to bind now and then under load.
const TEST_PORT_FIRST: u16 = 20_000;
/// Ports per test process: tests of one binary share a process and take ports from one counter.
const TEST_PORT_SPAN: u16 = 12_000;
const _: () = assert!(TEST_PORT_FIRST as u32 + TEST_PORT_SPAN as u32 <= 32_768);

/// A loopback TCP port no one listens on now, never handed out twice by this process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries run one after another; start each at its own place so a leftover of one does not
    // meet the next one's first ports.
    let base = (std::process::id() % u32::from(TEST_PORT_SPAN)) as u16;
    for _ in 0..TEST_PORT_SPAN {
        let offset = (base + NEXT.fetch_add(1, Ordering::Relaxed) % TEST_PORT_SPAN) % TEST_PORT_SPAN;
        let port = TEST_PORT_FIRST + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORT_FIRST}..{}", TEST_PORT_FIRST + TEST_PORT_SPAN);
}

/// Waits until the node started as `child` answers `/healthz` at `url`; if it exits first, or does not
/// answer in time, fails with its log (the file at `log`) rather than a bare timeout.
pub fn wait_up(child: &mut Child, url: &str, log: &Path) {
    let start = Instant::now();
    loop {
        if ureq::get(&format!("{url}/healthz")).timeout(Duration::from_secs(5)).call().is_ok() {
            return;
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || start.elapsed() > NODE_START_LIMIT {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("node at {url} not up after {:?} (exit: {exited:?}); its log:\n{text}", start.elapsed());
        }
        // Short: the soak restarts a node hundreds of times.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Creates a market in `<dir>/market` and enrols an organiser's tablet into `<dir>/tablet`, with
/// the CLI as an organiser would.
pub fn enrol_tablet(dir: &Path) {
    for args in [
        &["market", "init", "--dir", "market"][..],
        &["device", "enroll", "--market", "market", "--stall", "Stall", "--role", "organiser", "--out", "tablet"],
    ] {
        let out = Command::new(binary()).args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A `stallmesh up` process on loopback (mesh and inference off: nothing is announced beyond the
/// machine), started in `dir` with the credentials `creds` and the data directory `data`, its log
/// appended to `<dir>/node.log`; killed (SIGKILL) when dropped, so a failing test leaves none behind.
pub struct LoopbackNode {
    pub child: Child,
    pub url: String,
    log: PathBuf,
}

impl LoopbackNode {
    /// Starts the process; returns at once (see [`LoopbackNode::wait_up`]).
    pub fn start(dir: &Path, creds: &str, data: &str, port: u16) -> LoopbackNode {
        let log = dir.join("node.log");
        let out = std::fs::File::options().create(true).append(true).open(&log).unwrap();
        let child = Command::new(binary())
            .args(["up", "--credentials", creds, "--data-dir", data, "--http-addr", &format!("127.0.0.1:{port}")])
            .current_dir(dir)
            .env("STALLMESH_MESH_ENABLED", "false")
            .env("STALLMESH_INFERENCE_ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        LoopbackNode { child, url: format!("http://127.0.0.1:{port}"), log }
    }

    /// Starts the process and returns once it answers.
    pub fn up(dir: &Path, creds: &str, data: &str, port: u16) -> LoopbackNode {
        let mut node = Self::start(dir, creds, data, port);
        node.wait_up();
        node
    }

    pub fn wait_up(&mut self) {
        wait_up(&mut self.child, &self.url, &self.log);
    }

    /// SIGKILL, and the process reaped.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for LoopbackNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a node may take to answer after start: a debug build on 2 busy cores loads its models and
/// opens its store in a few seconds; a minute is for the slowest CI moments, not the normal case.
pub const NODE_START_LIMIT: Duration = Duration::from_secs(60);

/// Says loudly that a test did not run: straight to the terminal, past the test harness's capture
/// (which hides `eprintln!` of a passing test, so a skip would look like a pass).
pub fn skipped(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n!!! {msg}\n");
}
