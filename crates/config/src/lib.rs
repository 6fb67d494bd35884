//! Node configuration: embedded defaults (`config/stallmesh.toml`), then a file, then environment.
//! Everything a configuration says is checked here, by [`Config::load`], before a node uses it.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The documented default configuration, embedded so `stallmesh up` works with no file at all.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../config/stallmesh.toml");

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
    pub cloud: CloudSettings,
    pub loyalty: LoyaltySettings,
    pub staff: StaffSettings,
    pub store: StoreSettings,
    /// What `stallmesh cloud up` runs (not the tablet).
    pub cloud_service: CloudConfig,
}

/// The `[cloud_service]` table: what `stallmesh cloud up` runs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Empty: the embedded store in `data_dir`.
    pub postgres_url: String,
    /// Empty: no publishing.
    pub nats_url: String,
    pub nats_stream: String,
    /// Empty: generated once into `<data_dir>/admin.token` (mode 0600).
    pub admin_token: String,
    pub watermark_interval_ms: u64,
    /// How long an online buyer's hold on a drop's units lasts unless paid.
    pub hold_ttl_ms: u64,
}

/// Most inference workers: each holds its own copy of the models in memory, and a tablet has a
/// few cores (the pool's own bound is at least this, asserted where the node starts it).
pub const MAX_INFERENCE_WORKERS: usize = 8;

/// The `[cloud]` table: this tablet's uplink.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloudSettings {
    /// Empty: no uplink.
    pub url: String,
}

/// The `[staff]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaffSettings {
    pub sign_in: SignIn,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignIn {
    Auto,
    Required,
    Off,
}

impl Config {
    /// Whether the page and the API need a signed-in staff member.
    pub fn sign_in_required(&self) -> bool {
        match self.staff.sign_in {
            SignIn::Auto => !self.http_addr.ip().is_loopback(),
            SignIn::Required => true,
            SignIn::Off => false,
        }
    }
}

/// The `[loyalty]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoyaltySettings {
    pub cents_per_point: u64,
    pub point_value_cents: u64,
    pub stall_multipliers: Vec<String>,
    pub offline_points_per_card: u64,
    pub offline_points_per_device: u64,
    pub offline_vouchers_per_device: u64,
    pub ask_wait_ms: u64,
}

/// Highest offline budget: a typo guard (a budget is what a tablet may give away unproven).
pub const MAX_OFFLINE_BUDGET: u64 = 1_000_000;
/// Longest wait for a holder's transfer: a customer stands at the till.
pub const MAX_LOYALTY_ASK_WAIT_MS: u64 = 10_000;

impl LoyaltySettings {
    /// The earning rule; `stall_multipliers` were checked by [`Config::load`].
    pub fn earning_rule(&self) -> stallmesh_loyalty::EarningRule {
        let stall_multipliers = self.stall_multipliers.iter().filter_map(|s| parse_multiplier(s).ok()).collect();
        stallmesh_loyalty::EarningRule {
            cents_per_point: self.cents_per_point,
            stall_multipliers,
            point_value_cents: self.point_value_cents,
        }
    }

    pub fn offline_budget(&self) -> stallmesh_loyalty::OfflineBudget {
        stallmesh_loyalty::OfflineBudget {
            points_per_card: self.offline_points_per_card,
            points_per_device: self.offline_points_per_device,
            vouchers_per_device: self.offline_vouchers_per_device,
        }
    }
}

/// `"Stall name=2"` → ("Stall name", 2).
fn parse_multiplier(text: &str) -> Result<(String, u64), String> {
    let (stall, m) = text.rsplit_once('=').ok_or_else(|| format!("{text:?} is not \"Stall name=multiplier\""))?;
    let m: u64 = m.trim().parse().map_err(|_| format!("{text:?}: the multiplier is not a whole number"))?;
    if stall.trim().is_empty() || !(1..=stallmesh_loyalty::MAX_STALL_MULTIPLIER).contains(&m) {
        return Err(format!("{text:?}: a stall name and a multiplier 1..={}", stallmesh_loyalty::MAX_STALL_MULTIPLIER));
    }
    Ok((stall.trim().to_string(), m))
}

/// The `[store]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// Concurrent local operations share one durable commit (one fsync); each is still answered
    /// only after the commit that holds it. Off: each waits for a commit of its own.
    pub group_commit: bool,
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

/// Prefix of the environment variables that set configuration keys: `mesh.listen` is
/// `STALLMESH_MESH_LISTEN`.
pub const ENV_PREFIX: &str = "STALLMESH_";

impl Config {
    /// Defaults, overlaid with `file` (if any), then `STALLMESH_*` variables from `env`.
    ///
    /// Layers are overlaid generically: each is a TOML table checked against the embedded defaults
    /// (which name every key, so a key they lack is a typo, refused with the layer it came from),
    /// tables merge key by key, and every default key can be set from the environment, parsed as
    /// the type its default has (a list from comma-separated values).
    pub fn load(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = match file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?),
            None => None,
        };
        let origin = file.map(|p| p.display().to_string()).unwrap_or_default();
        Self::from_text(text.as_deref().map(|t| (origin.as_str(), t)), env)
    }

    /// As [`Config::load`], with the file's text (and the name errors give it) already read.
    pub fn from_text(file: Option<(&str, &str)>, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let parse = |origin: &str, text: &str| -> Result<toml::Table, ConfigError> {
            text.parse::<toml::Table>().map_err(|e| ConfigError::Invalid { origin: origin.to_string(), detail: e.to_string() })
        };
        let defaults = parse("embedded defaults", DEFAULT_CONFIG_TOML)?;
        let mut merged = defaults.clone();
        if let Some((origin, text)) = file {
            let layer = parse(origin, text)?;
            check_layer(&defaults, &layer, "", origin)?;
            overlay(&mut merged, layer);
        }
        overlay(&mut merged, env_layer(&defaults, "", &env)?);
        let invalid = |key: &str, detail: String| ConfigError::Invalid { origin: key.to_string(), detail };
        // Through text: the document deserializer's errors show the offending key and value.
        let text = toml::to_string(&merged).map_err(|e| invalid("configuration", e.to_string()))?;
        let config: Config = toml::from_str(&text).map_err(|e| invalid("configuration", e.to_string()))?;
        let inference = &config.inference;
        if inference.treatment_percent > 100 {
            return Err(invalid("inference.treatment_percent", format!("{} is not a percentage 0..=100", inference.treatment_percent)));
        }
        if inference.workers == 0 || inference.workers > MAX_INFERENCE_WORKERS || inference.queue_len == 0 {
            return Err(invalid("inference", format!("workers must be 1..={MAX_INFERENCE_WORKERS} and queue_len at least 1")));
        }
        let loyalty = &config.loyalty;
        let mut stalls = std::collections::BTreeSet::new();
        for m in &loyalty.stall_multipliers {
            let (stall, _) = parse_multiplier(m).map_err(|e| invalid("loyalty.stall_multipliers", e))?;
            if !stalls.insert(stall.clone()) {
                return Err(invalid("loyalty.stall_multipliers", format!("stall {stall:?} is listed twice")));
            }
        }
        if loyalty.cents_per_point == 0 || loyalty.point_value_cents == 0 {
            return Err(invalid("loyalty", "cents_per_point and point_value_cents must be at least 1".into()));
        }
        let budgets = [loyalty.offline_points_per_card, loyalty.offline_points_per_device, loyalty.offline_vouchers_per_device];
        if budgets.iter().any(|b| *b > MAX_OFFLINE_BUDGET) {
            return Err(invalid(
                "loyalty.offline_*",
                format!("at most {MAX_OFFLINE_BUDGET}: the market's exposure is these times its tablets"),
            ));
        }
        if loyalty.ask_wait_ms > MAX_LOYALTY_ASK_WAIT_MS {
            return Err(invalid("loyalty.ask_wait_ms", format!("at most {MAX_LOYALTY_ASK_WAIT_MS} (a customer waits)")));
        }
        let url = &config.cloud.url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid("cloud.url", format!("{url:?} is not an http:// or https:// address")));
        }
        for addr in config.mesh.listen.iter().chain(&config.mesh.bootstrap) {
            addr.parse::<multiaddr::Multiaddr>().map_err(|e| invalid("mesh", format!("{addr:?} is not a multiaddr: {e}")))?;
        }
        Ok(config)
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
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir);
        beside_exe.into_iter().chain([checkout]).find(|p| p.exists()).unwrap_or_else(|| dir.clone())
    }
}

/// The `STALLMESH_*` variable names among `names` that set no configuration key: a typo in one
/// (`STALLMESH_MESH_MDSN`) would otherwise leave the default in force unnoticed. Names the tools
/// themselves read (tests, benchmarks) are not configuration either, so the caller warns.
pub fn unknown_env_vars(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let defaults: toml::Table = DEFAULT_CONFIG_TOML.parse().expect("the embedded defaults parse");
    let mut known = Vec::new();
    collect_env_names(&defaults, "", &mut known);
    names.into_iter().filter(|n| n.starts_with(ENV_PREFIX) && !known.contains(n)).collect()
}

fn collect_env_names(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match value {
            toml::Value::Table(t) => collect_env_names(t, &format!("{path}."), out),
            _ => out.push(format!("{ENV_PREFIX}{}", path.replace('.', "_").to_uppercase())),
        }
    }
}

/// Refuses a key the defaults do not have, or a value of another type than the default's.
fn check_layer(defaults: &toml::Table, layer: &toml::Table, prefix: &str, origin: &str) -> Result<(), ConfigError> {
    for (key, value) in layer {
        let path = format!("{prefix}{key}");
        let Some(default) = defaults.get(key) else {
            return Err(ConfigError::Invalid { origin: origin.to_string(), detail: format!("unknown key `{path}`") });
        };
        match (default, value) {
            (toml::Value::Table(d), toml::Value::Table(l)) => check_layer(d, l, &format!("{path}."), origin)?,
            (d, v) if d.same_type(v) => {}
            (d, v) => {
                return Err(ConfigError::Invalid {
                    origin: origin.to_string(),
                    detail: format!("`{path}` must be a {}, not a {}", d.type_str(), v.type_str()),
                })
            }
        }
    }
    Ok(())
}

/// Tables merge key by key; any other value replaces the one below it.
fn overlay(base: &mut toml::Table, layer: toml::Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => overlay(b, l),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// The keys set by `STALLMESH_*` variables, each parsed as the type of its default.
fn env_layer(defaults: &toml::Table, prefix: &str, env: &impl Fn(&str) -> Option<String>) -> Result<toml::Table, ConfigError> {
    let mut layer = toml::Table::new();
    for (key, default) in defaults {
        let path = format!("{prefix}{key}");
        if let toml::Value::Table(d) = default {
            let sub = env_layer(d, &format!("{path}."), env)?;
            if !sub.is_empty() {
                layer.insert(key.clone(), toml::Value::Table(sub));
            }
            continue;
        }
        let var = format!("{ENV_PREFIX}{}", path.replace('.', "_").to_uppercase());
        let Some(text) = env(&var) else { continue };
        let invalid = |detail: String| ConfigError::Invalid { origin: var.clone(), detail };
        let value = match default {
            toml::Value::String(_) => toml::Value::String(text),
            toml::Value::Boolean(_) => toml::Value::Boolean(match text.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => return Err(invalid(format!("{other:?} is not true or false"))),
            }),
            toml::Value::Integer(_) => {
                toml::Value::Integer(text.trim().parse().map_err(|_| invalid(format!("{text:?} is not a whole number")))?)
            }
            toml::Value::Array(_) => toml::Value::Array(
                text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect(),
            ),
            other => return Err(invalid(format!("cannot be set from the environment (a {})", other.type_str()))),
        };
        layer.insert(key.clone(), value);
    }
    Ok(layer)
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

    #[test]
    fn every_default_key_is_settable_from_the_environment_as_its_own_type() {
        let env = |k: &str| match k {
            "STALLMESH_MESH_REFILL" => Some("7".to_string()),
            "STALLMESH_MESH_LISTEN" => Some("/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2".to_string()),
            "STALLMESH_INFERENCE_WORKERS" => Some("2".to_string()),
            "STALLMESH_LOG_FORMAT" => Some("json".to_string()),
            _ => None,
        };
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.mesh.refill, 7);
        assert_eq!(c.mesh.listen, vec!["/ip4/127.0.0.1/tcp/1".to_string(), "/ip4/127.0.0.1/tcp/2".to_string()]);
        assert_eq!(c.inference.workers, 2);
        assert_eq!(c.log_format, LogFormat::Json);
        let err = Config::load(None, |k| (k == "STALLMESH_MESH_REFILL").then(|| "many".to_string())).unwrap_err().to_string();
        assert!(err.contains("STALLMESH_MESH_REFILL") && err.contains("whole number"), "{err}");
        let err = Config::load(None, |k| (k == "STALLMESH_MESH_MDNS").then(|| "maybe".to_string())).unwrap_err().to_string();
        assert!(err.contains("STALLMESH_MESH_MDNS"), "{err}");
    }

    #[test]
    fn an_environment_variable_that_sets_no_key_is_reported() {
        let names = ["STALLMESH_MESH_MDSN", "STALLMESH_MESH_MDNS", "STALLMESH_HTTP_ADDR", "PATH"].map(String::from);
        assert_eq!(unknown_env_vars(names), vec!["STALLMESH_MESH_MDSN".to_string()]);
    }

    #[test]
    fn a_file_key_unknown_to_the_defaults_or_of_the_wrong_type_is_refused_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[mesh]
refil = 3
",
        )
        .unwrap();
        let err = Config::load(Some(&f), |_| None).unwrap_err().to_string();
        assert!(err.contains("mesh.refil") && err.contains("c.toml"), "{err}");
        std::fs::write(
            &f,
            "[mesh]
refill = \"3\"
",
        )
        .unwrap();
        let err = Config::load(Some(&f), |_| None).unwrap_err().to_string();
        assert!(err.contains("mesh.refill") && err.contains("integer"), "{err}");
        std::fs::write(
            &f,
            "mesh = 1
",
        )
        .unwrap();
        assert!(Config::load(Some(&f), |_| None).is_err(), "a table replaced by a value");
    }
}
