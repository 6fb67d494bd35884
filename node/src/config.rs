//! Node configuration: embedded defaults (`config/stallmesh.toml`), then a file, then environment.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The documented default configuration, embedded so `stallmesh up` works with no file at all.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/stallmesh.toml");

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    /// Empty means: `<data_dir>/device`, or demo mode if that does not exist.
    pub credentials_dir: PathBuf,
    pub log_format: LogFormat,
    pub mesh: MeshSettings,
    pub inference: InferenceSettings,
}

/// The `[inference]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InferenceSettings {
    pub enabled: bool,
    pub models_dir: PathBuf,
    pub workers: usize,
    pub queue_len: usize,
    pub treatment_percent: u8,
}

/// The `[mesh]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MeshSettings {
    pub enabled: bool,
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    pub mdns: bool,
    pub min_keep: u64,
    pub low_watermark: u64,
    pub refill: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {detail}")]
    Invalid { origin: String, detail: String },
}

/// Keys in one layer: every field optional, unknown keys refused (a typo must not be ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layer {
    data_dir: Option<PathBuf>,
    http_addr: Option<String>,
    credentials_dir: Option<PathBuf>,
    log_format: Option<String>,
    mesh: Option<MeshLayer>,
    inference: Option<InferenceLayer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferenceLayer {
    enabled: Option<bool>,
    models_dir: Option<PathBuf>,
    workers: Option<usize>,
    queue_len: Option<usize>,
    treatment_percent: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeshLayer {
    enabled: Option<bool>,
    listen: Option<Vec<String>>,
    bootstrap: Option<Vec<String>>,
    mdns: Option<bool>,
    min_keep: Option<u64>,
    low_watermark: Option<u64>,
    refill: Option<u64>,
}

impl Config {
    /// Defaults, overlaid with `file` (if any), then `STALLMESH_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut layers = vec![("embedded defaults".to_string(), DEFAULT_CONFIG_TOML.to_string())];
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
            layers.push((path.display().to_string(), text));
        }
        let mut merged = Layer::default();
        for (origin, text) in layers {
            let layer: Layer = toml::from_str(&text).map_err(|e| ConfigError::Invalid { origin, detail: e.to_string() })?;
            merged.data_dir = layer.data_dir.or(merged.data_dir);
            merged.http_addr = layer.http_addr.or(merged.http_addr);
            merged.credentials_dir = layer.credentials_dir.or(merged.credentials_dir);
            merged.log_format = layer.log_format.or(merged.log_format);
            if let Some(m) = layer.mesh {
                let cur = merged.mesh.get_or_insert_with(MeshLayer::default);
                cur.enabled = m.enabled.or(cur.enabled);
                cur.listen = m.listen.or(cur.listen.take());
                cur.bootstrap = m.bootstrap.or(cur.bootstrap.take());
                cur.mdns = m.mdns.or(cur.mdns);
                cur.min_keep = m.min_keep.or(cur.min_keep);
                cur.low_watermark = m.low_watermark.or(cur.low_watermark);
                cur.refill = m.refill.or(cur.refill);
            }
            if let Some(i) = layer.inference {
                let cur = merged.inference.get_or_insert_with(InferenceLayer::default);
                cur.enabled = i.enabled.or(cur.enabled);
                cur.models_dir = i.models_dir.or(cur.models_dir.take());
                cur.workers = i.workers.or(cur.workers);
                cur.queue_len = i.queue_len.or(cur.queue_len);
                cur.treatment_percent = i.treatment_percent.or(cur.treatment_percent);
            }
        }
        let list = |v: String| -> Vec<String> { v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect() };
        let mesh = merged.mesh.get_or_insert_with(MeshLayer::default);
        if let Some(v) = env("STALLMESH_MESH_LISTEN") {
            mesh.listen = Some(list(v));
        }
        if let Some(v) = env("STALLMESH_MESH_BOOTSTRAP") {
            mesh.bootstrap = Some(list(v));
        }
        let flag = |key: &str, v: String| -> Result<bool, ConfigError> {
            match v.as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                other => Err(ConfigError::Invalid { origin: key.into(), detail: format!("{other:?} is not true or false") }),
            }
        };
        if let Some(v) = env("STALLMESH_MESH_ENABLED") {
            mesh.enabled = Some(flag("STALLMESH_MESH_ENABLED", v)?);
        }
        if let Some(v) = env("STALLMESH_MESH_MDNS") {
            mesh.mdns = Some(flag("STALLMESH_MESH_MDNS", v)?);
        }
        let inference = merged.inference.get_or_insert_with(InferenceLayer::default);
        if let Some(v) = env("STALLMESH_INFERENCE_ENABLED") {
            inference.enabled = Some(flag("STALLMESH_INFERENCE_ENABLED", v)?);
        }
        if let Some(v) = env("STALLMESH_INFERENCE_MODELS_DIR") {
            inference.models_dir = Some(v.into());
        }
        if let Some(v) = env("STALLMESH_INFERENCE_TREATMENT_PERCENT") {
            let pct = v.parse::<u8>().ok().filter(|p| *p <= 100);
            inference.treatment_percent = Some(pct.ok_or_else(|| ConfigError::Invalid {
                origin: "STALLMESH_INFERENCE_TREATMENT_PERCENT".into(),
                detail: format!("{v:?} is not a percentage 0..=100"),
            })?);
        }
        if let Some(v) = env("STALLMESH_DATA_DIR") {
            merged.data_dir = Some(v.into());
        }
        if let Some(v) = env("STALLMESH_HTTP_ADDR") {
            merged.http_addr = Some(v);
        }
        if let Some(v) = env("STALLMESH_CREDENTIALS_DIR") {
            merged.credentials_dir = Some(v.into());
        }
        if let Some(v) = env("STALLMESH_LOG_FORMAT") {
            merged.log_format = Some(v);
        }
        let invalid = |key: &str, detail: String| ConfigError::Invalid { origin: key.to_string(), detail };
        let http_addr = merged.http_addr.unwrap_or_default();
        let m = merged.mesh.take().unwrap_or_default();
        let mesh = MeshSettings {
            enabled: m.enabled.unwrap_or(true),
            listen: m.listen.unwrap_or_default(),
            bootstrap: m.bootstrap.unwrap_or_default(),
            mdns: m.mdns.unwrap_or(true),
            min_keep: m.min_keep.unwrap_or(1),
            low_watermark: m.low_watermark.unwrap_or(1),
            refill: m.refill.unwrap_or(5),
        };
        let i = merged.inference.take().unwrap_or_default();
        let inference = InferenceSettings {
            enabled: i.enabled.unwrap_or(true),
            models_dir: i.models_dir.unwrap_or_else(|| PathBuf::from("models")),
            workers: i.workers.unwrap_or(1),
            queue_len: i.queue_len.unwrap_or(32),
            treatment_percent: i.treatment_percent.unwrap_or(50),
        };
        if inference.treatment_percent > 100 {
            return Err(invalid("inference.treatment_percent", format!("{} is not a percentage 0..=100", inference.treatment_percent)));
        }
        if inference.workers == 0 || inference.workers > stallmesh_inference::pool::MAX_WORKERS || inference.queue_len == 0 {
            return Err(invalid(
                "inference",
                format!("workers must be 1..={} and queue_len at least 1", stallmesh_inference::pool::MAX_WORKERS),
            ));
        }
        for addr in mesh.listen.iter().chain(&mesh.bootstrap) {
            addr.parse::<libp2p::Multiaddr>().map_err(|e| invalid("mesh", format!("{addr:?} is not a multiaddr: {e}")))?;
        }
        Ok(Config {
            mesh,
            inference,
            data_dir: merged.data_dir.unwrap_or_default(),
            http_addr: http_addr.parse().map_err(|e| invalid("http_addr", format!("{http_addr:?}: {e}")))?,
            credentials_dir: merged.credentials_dir.unwrap_or_default(),
            log_format: match merged.log_format.as_deref() {
                Some("json") => LogFormat::Json,
                Some("text") | None => LogFormat::Text,
                Some(other) => return Err(invalid("log_format", format!("{other:?} is not \"text\" or \"json\""))),
            },
        })
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("stallmesh.redb")
    }

    pub fn embeddings_path(&self) -> PathBuf {
        self.data_dir.join("embeddings.redb")
    }

    /// Where the models are: `models_dir` as given if it exists; a relative one is also looked for
    /// next to the executable and in the source checkout the binary was built from (`cargo run`).
    pub fn resolved_models_dir(&self) -> PathBuf {
        let dir = &self.inference.models_dir;
        if dir.is_absolute() || dir.exists() {
            return dir.clone();
        }
        let beside_exe = std::env::current_exe().ok().and_then(|e| e.parent().map(|p| p.join(dir)));
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        beside_exe.into_iter().chain([checkout]).find(|p| p.exists()).unwrap_or_else(|| dir.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_file_and_environment_layer_in_that_order() {
        let c = Config::load(None, |_| None).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:7878");
        assert_eq!(c.data_dir, PathBuf::from("stallmesh-data"));
        assert!(c.mesh.enabled && c.mesh.mdns);
        assert_eq!(c.mesh.listen, vec!["/ip4/0.0.0.0/tcp/0".to_string()]);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "http_addr = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n[mesh]\nmdns = false\n").unwrap();
        let c = Config::load(Some(&f), |k| (k == "STALLMESH_DATA_DIR").then(|| "/tmp/y".to_string())).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:9000");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/y"));
        assert!(!c.mesh.mdns && c.mesh.enabled, "a file sets one mesh key, the rest stay default");
        let err = Config::load(None, |k| (k == "STALLMESH_MESH_BOOTSTRAP").then(|| "not-an-addr".to_string())).unwrap_err();
        assert!(err.to_string().contains("multiaddr"), "{err}");

        std::fs::write(&f, "htp_addr = \"x\"\n").unwrap();
        let err = Config::load(Some(&f), |_| None).unwrap_err().to_string();
        assert!(err.contains("htp_addr"), "{err}");
        let err = Config::load(None, |k| (k == "STALLMESH_HTTP_ADDR").then(|| "nope".to_string())).unwrap_err();
        assert!(err.to_string().contains("http_addr"), "{err}");
    }
}
