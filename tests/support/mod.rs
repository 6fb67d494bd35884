//! A real node serving real HTTP on loopback, with a real redb file, for the API tests.
#![allow(dead_code)]

use serde_json::Value;
use stallmesh_identity::files::{self, DeviceCredentials};
use stallmesh_identity::{DeviceKey, MarketKey, Role};
use stallmesh_node::config::{Config, LogFormat};
use std::path::{Path, PathBuf};

/// A client that never reuses a connection: the server closes a connection after refusing a body it
/// did not read (413, 415), and a pooled reuse of it would fail with a broken pipe, not a status.
pub fn fresh_agent() -> ureq::Agent {
    ureq::AgentBuilder::new().max_idle_connections(0).build()
}

pub struct TestNode {
    pub base: String,
    pub data_dir: PathBuf,
    pub creds_dir: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Creates a market in `dir/market` and enrols a device whose credentials go to `dir/<name>`.
pub fn enrol(dir: &Path, name: &str, stall: &str) -> (PathBuf, MarketKey) {
    enrol_as(dir, name, stall, Role::Seller)
}

/// As [`enrol`], with a chosen role (an organiser may edit every stall's catalogue).
pub fn enrol_as(dir: &Path, name: &str, stall: &str, role: Role) -> (PathBuf, MarketKey) {
    let market_dir = dir.join("market");
    let (market, info) = if market_dir.join(files::MARKET_KEY_FILE).exists() {
        files::load_market(&market_dir).unwrap()
    } else {
        files::init_market(&market_dir, "Test Market").unwrap()
    };
    let key = DeviceKey::generate().unwrap();
    let certificate = market.enrol(key.device_id(), stall, role, u64::MAX);
    let out = dir.join(name);
    files::write_device(&out, &DeviceCredentials { key, certificate, market: info, mesh_psk: market.mesh_psk() }).unwrap();
    (out, market)
}

impl TestNode {
    pub fn start(data_dir: &Path, creds_dir: &Path) -> Result<TestNode, stallmesh_node::StartError> {
        Self::start_with(data_dir, creds_dir, |_| {})
    }

    /// As [`TestNode::start`], after `tweak` has changed the configuration.
    pub fn start_with(data_dir: &Path, creds_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Result<TestNode, stallmesh_node::StartError> {
        let mut config = Config::load(None, |_| None).unwrap();
        config.data_dir = data_dir.to_path_buf();
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.credentials_dir = creds_dir.to_path_buf();
        config.log_format = LogFormat::Text;
        // These tests exercise one node's API; the mesh has tests of its own (tests/mesh.rs).
        config.mesh.enabled = false;
        tweak(&mut config);
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = runtime.block_on(stallmesh_node::start(&config, async {
            let _ = rx.await;
        }))?;
        Ok(TestNode {
            base: format!("http://{}", running.addr),
            data_dir: data_dir.to_path_buf(),
            creds_dir: creds_dir.to_path_buf(),
            runtime: Some(runtime),
            shutdown: Some(tx),
            server: Some(running.server),
        })
    }

    /// Stops serving and releases the store (as a clean shutdown does).
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let (Some(tx), Some(server), Some(rt)) = (self.shutdown.take(), self.server.take(), self.runtime.take()) {
            let _ = tx.send(());
            let _ = rt.block_on(server);
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }

    pub fn restart(mut self) -> TestNode {
        self.shutdown_now();
        TestNode::start(&self.data_dir, &self.creds_dir).expect("restart")
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let req = fresh_agent().request(method, &format!("{}{path}", self.base));
        let result = match body {
            Some(b) => req.set("content-type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(&body.to_string()))
    }

    pub fn post_bytes(&self, path: &str, bytes: &[u8]) -> (u16, Value) {
        let result = ureq::post(&format!("{}{path}", self.base)).set("content-type", "application/octet-stream").send_bytes(bytes);
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path}: {e}"),
        };
        let status = resp.status();
        (status, resp.into_json().unwrap_or(Value::Null))
    }

    /// Sends raw bytes on a fresh connection. A server that refuses a body before reading it may reset
    /// the connection while the client still writes: that is retried, up to five times.
    pub fn send_bytes(&self, method: &str, path: &str, content_type: &str, bytes: &[u8]) -> (u16, Value) {
        for _ in 0..5 {
            let result = fresh_agent().request(method, &format!("{}{path}", self.base)).set("content-type", content_type).send_bytes(bytes);
            let resp = match result {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(ureq::Error::Transport(_)) => continue,
            };
            let status = resp.status();
            return (status, resp.into_json().unwrap_or(Value::Null));
        }
        panic!("{method} {path}: the connection failed five times");
    }

    pub fn get_bytes(&self, path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut ureq::get(&format!("{}{path}", self.base)).call().unwrap().into_reader(), &mut out).unwrap();
        out
    }

    pub fn metric(&self, line_prefix: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.base)).call().unwrap().into_string().unwrap();
        text.lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}
