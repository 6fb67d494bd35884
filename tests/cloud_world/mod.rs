//! The cloud's end-to-end world, shared by the cloud tests and the drop tests: real `stallmesh
//! up` tablets meshed over loopback, a real `stallmesh cloud up`, and a cuttable uplink.
#![allow(dead_code)] // each including test uses what it needs

use crate::netns::{self, binary, free_port};
use serde_json::{json, Value};
use stallmesh_identity::files;
use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const CONVERGE: Duration = Duration::from_secs(40);

pub fn get(url: &str) -> Value {
    ureq::get(url).timeout(Duration::from_secs(10)).call().unwrap_or_else(|e| panic!("GET {url}: {e}")).into_json().unwrap()
}

pub fn post(url: &str, body: &Value) -> (u16, Value) {
    match ureq::post(url).timeout(Duration::from_secs(10)).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP forwarder standing in for the 4G link: `cut` refuses and drops connections.
pub struct Link {
    pub addr: String,
    up: Arc<AtomicBool>,
}

impl Link {
    pub fn to(target: String) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            use std::io::{Read, Write};
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) if flag.load(Ordering::SeqCst) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Ok(_) => break,
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Link { addr: format!("http://{addr}"), up }
    }
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
    }
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub cloud: Option<Proc>,
    pub cloud_url: String,
    pub tablets: Vec<Option<Proc>>,
    pub http: Vec<String>,
    pub mesh_ports: Vec<u16>,
    pub market_id: String,
}

impl World {
    pub fn new(n: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(binary()).args(args).current_dir(dir.path()).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["market", "init", "--dir", "market", "--name", "Saturday Market"]);
        for k in 1..=n {
            run(&["device", "enroll", "--market", "market", "--stall", &format!("Stall {k}"), "--role", "organiser", "--out", &format!("tablet{k}")]);
        }
        run(&["device", "enroll", "--market", "market", "--stall", "cloud", "--role", "cloud", "--out", "cloud-device"]);
        let market_id = files::load_market_info(&dir.path().join("market")).unwrap().market_id.to_hex();
        World {
            dir,
            cloud: None,
            cloud_url: String::new(),
            tablets: (0..=n).map(|_| None).collect(),
            http: (0..=n).map(|_| String::new()).collect(),
            mesh_ports: (0..=n).map(|_| free_port()).collect(),
            market_id,
        }
    }

    pub fn start_cloud(&mut self, postgres_url: Option<&str>) {
        self.start_cloud_with(postgres_url, &[]);
    }

    /// As [`World::start_cloud`], with `STALLMESH_CLOUD_SERVICE_*` settings of the test's.
    pub fn start_cloud_with(&mut self, postgres_url: Option<&str>, env: &[(&str, &str)]) {
        let port = free_port();
        let mut cmd = Command::new(binary());
        cmd.args(["cloud", "up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(self.dir.path().join("cloud"));
        if let Some(u) = postgres_url {
            cmd.args(["--postgres-url", u]);
        }
        let log = std::fs::File::create(self.dir.path().join("cloud.log")).unwrap();
        cmd.env("STALLMESH_CLOUD_SERVICE_WATERMARK_INTERVAL_MS", "500");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.cloud_url = format!("http://127.0.0.1:{port}");
        let mut proc = Proc(child);
        netns::wait_up(&mut proc.0, &self.cloud_url, &self.dir.path().join("cloud.log"));
        self.cloud = Some(proc);
    }

    pub fn register_market(&self) {
        let out = Command::new(binary())
            .args(["cloud", "market", "add", "cloud-device", "--cloud", &self.cloud_url, "--data-dir", "cloud"])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "market add: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts tablets 1 to 3 meshed over loopback, tablet 1 reaching the cloud through the
    /// returned link (cut it for a dead 4G), the others with no uplink; waits until they mesh.
    pub fn start_three_tablets(&mut self) -> Link {
        let link = Link::to(self.cloud_url.trim_start_matches("http://").to_string());
        self.start_tablet(1, Some(&link.addr));
        self.start_tablet(2, None);
        self.start_tablet(3, None);
        for k in 1..=3 {
            crate::netns::eventually(CONVERGE, &format!("tablet {k} meshed"), || {
                self.tablet(k, "/api/v1/mesh")["peers"].as_array().map_or(0, Vec::len) >= 2
            });
        }
        link
    }

    /// Runs a `stallmesh` command in the world's directory; panics with its stderr if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let out = Command::new(binary()).args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Enrols the market's online channel and sets it up on the cloud; returns its device id.
    pub fn set_up_online_channel(&self) -> String {
        self.run(&["device", "enroll", "--market", "market", "--stall", "online", "--role", "online", "--out", "online-device"]);
        let out = self.run(&["cloud", "market", "online", "online-device", "--cloud", &self.cloud_url, "--data-dir", "cloud"]);
        let device = files::load_device(&self.dir.path().join("online-device")).unwrap().certificate.device.to_hex();
        assert!(out.contains(&device), "the CLI names the online device {device}: {out}");
        device
    }

    /// The cloud's admin token, as a shop's server holds it.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cloud").join("admin.token")).unwrap().trim().to_string()
    }

    pub fn start_tablet(&mut self, k: usize, cloud_url: Option<&str>) {
        let http_port = free_port();
        let others: Vec<String> =
            (1..self.tablets.len()).filter(|j| *j != k).map(|j| format!("/ip4/127.0.0.1/tcp/{}", self.mesh_ports[j])).collect();
        let mut cmd = Command::new(binary());
        cmd.args(["up", "--credentials"])
            .arg(self.dir.path().join(format!("tablet{k}")))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data{k}")))
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .env("STALLMESH_MESH_LISTEN", format!("/ip4/127.0.0.1/tcp/{}", self.mesh_ports[k]))
            .env("STALLMESH_MESH_BOOTSTRAP", others.join(","))
            .env("STALLMESH_MESH_MDNS", "false")
            .env("STALLMESH_INFERENCE_ENABLED", "false")
            .env("RUST_LOG", "info");
        if let Some(u) = cloud_url {
            cmd.args(["--cloud-url", u]);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("tablet{k}.log"))).unwrap();
        let mut proc = Proc(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap());
        self.http[k] = format!("http://127.0.0.1:{http_port}");
        netns::wait_up(&mut proc.0, &self.http[k], &self.dir.path().join(format!("tablet{k}.log")));
        self.tablets[k] = Some(proc);
    }

    pub fn stop_tablet(&mut self, k: usize) {
        self.tablets[k].take();
    }

    pub fn tablet(&self, k: usize, path: &str) -> Value {
        get(&format!("{}{path}", self.http[k]))
    }

    pub fn device(&self, k: usize) -> String {
        self.tablet(k, "/api/v1/status")["node"]["device"].as_str().unwrap().to_string()
    }

    /// The cloud's log, read as a consumer does (pages of `after=`).
    pub fn cloud_log(&self) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        loop {
            let after = out.last().map_or(0, |e| e["offset"].as_u64().unwrap());
            let url = format!("{}/v1/markets/{}/events?after={after}&limit=1000", self.cloud_url, self.market_id);
            let text = ureq::get(&url).call().unwrap().into_string().unwrap();
            let page: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if page.is_empty() {
                return out;
            }
            assert!(page.iter().all(|e| e["offset"].as_u64().unwrap() > after), "a page after {after} starts after it");
            out.extend(page);
        }
    }

    pub fn cloud_sale_ids(&self) -> Vec<String> {
        self.cloud_log().iter().filter(|e| e["kind"] == "sale").map(|e| e["sale_id"].as_str().unwrap().to_string()).collect()
    }
}

pub fn sell(w: &World, k: usize, sku: &str) -> String {
    let (status, sale) = post(&format!("{}/api/v1/sales", w.http[k]), &json!({ "lines": [{ "sku": sku, "qty": 1 }] }));
    assert_eq!(status, 201, "sale on tablet {k}: {sale}");
    sale["id"].as_str().unwrap().to_string()
}

/// The log holds each (device, seq) once, with offsets 1, 2, 3, … and every sale in `sold` once.
pub fn assert_log_exact(w: &World, sold: &BTreeSet<String>) {
    let log = w.cloud_log();
    let offsets: Vec<u64> = log.iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (1..=log.len() as u64).collect::<Vec<_>>(), "gapless offsets");
    let dots: BTreeSet<(String, u64)> = log.iter().map(|e| (e["device"].as_str().unwrap().to_string(), e["seq"].as_u64().unwrap())).collect();
    assert_eq!(dots.len(), log.len(), "each change once");
    let ids = w.cloud_sale_ids();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "no sale twice in the log");
    assert!(sold.is_subset(&unique), "missing from the cloud: {:?}", sold.difference(&unique).collect::<Vec<_>>());
}

