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
        Ok(Config {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_file_and_environment_layer_in_that_order() {
        let c = Config::load(None, |_| None).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:7878");
        assert_eq!(c.data_dir, PathBuf::from("stallmesh-data"));

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "http_addr = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        let c = Config::load(Some(&f), |k| (k == "STALLMESH_DATA_DIR").then(|| "/tmp/y".to_string())).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:9000");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/y"));

        std::fs::write(&f, "htp_addr = \"x\"\n").unwrap();
        let err = Config::load(Some(&f), |_| None).unwrap_err().to_string();
        assert!(err.contains("htp_addr"), "{err}");
        let err = Config::load(None, |k| (k == "STALLMESH_HTTP_ADDR").then(|| "nope".to_string())).unwrap_err();
        assert!(err.to_string().contains("http_addr"), "{err}");
    }
}
