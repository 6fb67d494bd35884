//! The `stallmesh` binary as a user runs it: demo mode, market and device administration, client
//! verbs, and a kill -9 in the middle of a day.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stallmesh");

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

struct Up {
    child: Child,
    url: String,
}

impl Up {
    /// Starts `stallmesh up` with its mesh on loopback and mDNS off: a test node must neither listen
    /// on the machine's interfaces nor announce itself on the machine's network.
    fn start(cwd: &Path, extra: &[&str]) -> Up {
        let addr = free_addr();
        let child = Command::new(BIN)
            .args(["up", "--http-addr", &addr])
            .args(extra)
            .env("STALLMESH_MESH_LISTEN", "/ip4/127.0.0.1/tcp/0")
            .env("STALLMESH_MESH_MDNS", "false")
            .env_remove("STALLMESH_MESH_BOOTSTRAP")
            .current_dir(cwd)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cwd.join(format!("up-{}.log", addr.replace(':', "_")))).unwrap())
            .spawn()
            .unwrap();
        let url = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(&format!("{url}/healthz")).call().is_err() {
            assert!(Instant::now() < deadline, "node did not come up at {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Up { child, url }
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(BIN).args(args).env("STALLMESH_NODE", &self.url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// The mesh's listen addresses, once it has bound them.
    fn mesh_listen_addrs(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mesh: serde_json::Value = ureq::get(&format!("{}/api/v1/mesh", self.url)).call().unwrap().into_json().unwrap();
            let addrs: Vec<String> =
                mesh["listen_addrs"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect();
            if !addrs.is_empty() || Instant::now() > deadline {
                return addrs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL: no shutdown path runs
        self.child.wait().unwrap();
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn demo_mode_sells_at_once_and_keeps_every_acknowledged_sale_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let node = Up::start(dir.path(), &[]);
    let listen = node.mesh_listen_addrs();
    assert!(!listen.is_empty() && listen.iter().all(|a| a.starts_with("/ip4/127.0.0.1/")), "mesh not on loopback only: {listen:?}");
    let (ok, stock) = node.cli(&["stock"]);
    assert!(ok && stock.contains("HNY-500"), "{stock}");

    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let (ok, out) = node.cli(&["sell", "HNY-500", "HNY-250:2", "--client-ref", &format!("t-{i}")]);
        assert!(ok, "{out}");
        acknowledged.push(out.split_whitespace().nth(1).unwrap().to_string());
    }
    // A refused sale reads as a sentence a stallholder understands, not a JSON dump.
    let (ok, out) = node.cli(&["sell", "BEE-CND:99"]);
    assert!(!ok, "{out}");
    assert_eq!(out, "Refused: not enough BEE-CND here — asked 99, this tablet holds 8; no other tablet holds any.\n");
    node.kill9();

    let node = Up::start(dir.path(), &[]);
    let (_, sales) = node.cli(&["sales", "--limit", "100"]);
    for id in &acknowledged {
        assert!(sales.contains(id.as_str()), "sale {id} lost after kill -9:\n{sales}");
    }
    assert!(sales.starts_with("10 sales"), "{sales}");
    let (_, stock) = node.cli(&["stock"]);
    let honey = stock.lines().find(|l| l.starts_with("HNY-500")).unwrap();
    assert_eq!(honey.split_whitespace().nth(1), Some("14"), "24 - 10 sold: {stock}");
}

#[test]
fn an_organiser_creates_a_market_and_enrols_a_device_that_then_sells() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run(&["market", "init", "--dir", "market", "--name", "Saturday Market"]);
    run(&["device", "enroll", "--market", "market", "--stall", "Honey", "--out", "tablet-1"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tablet-1/device.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let node = Up::start(dir.path(), &["--credentials", "tablet-1", "--data-dir", "tablet-1-data"]);
    let (ok, out) = node.cli(&["product", "--sku", "HNY-500", "--name", "Honey 500g", "--price-cents", "850", "--stall", "Honey"]);
    assert!(ok, "{out}");
    assert!(node.cli(&["restock", "HNY-500", "3"]).0);
    let (ok, out) = node.cli(&["sell", "HNY-500:3"]);
    assert!(ok && out.contains("25.50"), "{out}");
    let (ok, out) = node.cli(&["status"]);
    assert!(ok && out.contains("Saturday Market") && out.contains("\"demo\": false"), "{out}");
    let log = std::fs::read_dir(dir.path()).unwrap().flatten().find(|e| e.file_name().to_string_lossy().starts_with("up-")).unwrap();
    let log = std::fs::read_to_string(log.path()).unwrap();
    let secret = std::fs::read_to_string(dir.path().join("tablet-1/device.key")).unwrap();
    assert!(!log.contains(secret.trim()), "a private key was logged");
}

#[test]
fn every_verb_has_help() {
    for verb in [
        vec!["market", "init"],
        vec!["device", "enroll"],
        vec!["device", "revoke"],
        vec!["up"],
        vec!["sell"],
        vec!["restock"],
        vec!["transfer"],
        vec!["product"],
        vec!["stock"],
        vec!["sales"],
        vec!["status"],
        vec!["revoke"],
    ] {
        let out = Command::new(BIN).args(&verb).arg("--help").output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Usage"), "{verb:?}");
    }
}
