//! Key and certificate files. Secrets are written with mode 0600 and never logged.
//!
//! A market directory (the organiser's): `market.key` (secret, hex) and `market.json` (public).
//! A device directory (what a device starts from): `device.key`, `certificate.json`, `market.json`.

use crate::{Certificate, DeviceKey, MarketKey, MarketPublicKey, Revocation};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MARKET_KEY_FILE: &str = "market.key";
pub const MARKET_INFO_FILE: &str = "market.json";
pub const DEVICE_KEY_FILE: &str = "device.key";
pub const CERTIFICATE_FILE: &str = "certificate.json";
pub const MESH_PSK_FILE: &str = "mesh.psk";

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid {what}: {detail}")]
    Invalid { path: PathBuf, what: &'static str, detail: String },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io { path: path.to_path_buf(), source }
}

/// Public facts about a market that every device carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketInfo {
    pub name: String,
    pub market_id: crate::MarketId,
    pub public_key: MarketPublicKey,
}

/// Everything a device needs to join its market.
#[derive(Debug)]
pub struct DeviceCredentials {
    pub key: DeviceKey,
    pub certificate: Certificate,
    pub market: MarketInfo,
    /// The market's mesh pre-shared key (see [`MarketKey::mesh_psk`]).
    pub mesh_psk: [u8; 32],
}

fn write_secret(path: &Path, secret: &[u8; 32]) -> Result<(), FileError> {
    if path.exists() {
        return Err(FileError::Exists { path: path.to_path_buf() });
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(hex::encode(secret).as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn read_secret(path: &Path) -> Result<[u8; 32], FileError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|e| FileError::Invalid {
        path: path.to_path_buf(),
        what: "ed25519 secret key (64 hex characters)",
        detail: e.to_string(),
    })?;
    Ok(out)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let text = serde_json::to_string_pretty(value).expect("identity types always serialize");
    fs::write(path, text + "\n").map_err(io(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path, what: &'static str) -> Result<T, FileError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| FileError::Invalid { path: path.to_path_buf(), what, detail: e.to_string() })
}

/// Creates a new market in `dir`: a fresh key (0600) and its public info.
pub fn init_market(dir: &Path, name: &str) -> Result<(MarketKey, MarketInfo), FileError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let key =
        MarketKey::generate().map_err(|e| FileError::Invalid { path: dir.to_path_buf(), what: "random source", detail: e.to_string() })?;
    let info = MarketInfo { name: name.to_string(), market_id: key.market_id(), public_key: key.public() };
    write_secret(&dir.join(MARKET_KEY_FILE), &key.secret())?;
    write_json(&dir.join(MARKET_INFO_FILE), &info)?;
    Ok((key, info))
}

pub fn load_market(dir: &Path) -> Result<(MarketKey, MarketInfo), FileError> {
    let key = MarketKey::from_secret(read_secret(&dir.join(MARKET_KEY_FILE))?);
    let info = load_market_info(dir)?;
    if info.public_key != key.public() || info.market_id != key.market_id() {
        return Err(FileError::Invalid {
            path: dir.join(MARKET_INFO_FILE),
            what: "market info",
            detail: "does not match market.key".into(),
        });
    }
    Ok((key, info))
}

pub fn load_market_info(dir: &Path) -> Result<MarketInfo, FileError> {
    let path = dir.join(MARKET_INFO_FILE);
    let info: MarketInfo = read_json(&path, "market info")?;
    if info.public_key.market_id() != info.market_id {
        return Err(FileError::Invalid { path, what: "market info", detail: "market_id does not match public_key".into() });
    }
    Ok(info)
}

/// Writes a device's credentials into `dir` (which must not already hold a key).
pub fn write_device(dir: &Path, creds: &DeviceCredentials) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    write_secret(&dir.join(DEVICE_KEY_FILE), &creds.key.secret())?;
    write_secret(&dir.join(MESH_PSK_FILE), &creds.mesh_psk)?;
    write_json(&dir.join(CERTIFICATE_FILE), &creds.certificate)?;
    write_json(&dir.join(MARKET_INFO_FILE), &creds.market)
}

pub fn load_device(dir: &Path) -> Result<DeviceCredentials, FileError> {
    let key = DeviceKey::from_secret(read_secret(&dir.join(DEVICE_KEY_FILE))?);
    let cert_path = dir.join(CERTIFICATE_FILE);
    let certificate: Certificate = read_json(&cert_path, "enrolment certificate")?;
    let market = load_market_info(dir)?;
    let mesh_psk = read_secret(&dir.join(MESH_PSK_FILE))?;
    if certificate.device != key.device_id() {
        return Err(FileError::Invalid { path: cert_path, what: "enrolment certificate", detail: "issued for another device key".into() });
    }
    Ok(DeviceCredentials { key, certificate, market, mesh_psk })
}

pub fn write_revocation(path: &Path, rev: &Revocation) -> Result<(), FileError> {
    write_json(path, rev)
}

pub fn read_revocation(path: &Path) -> Result<Revocation, FileError> {
    read_json(path, "revocation")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn market_and_device_files_round_trip_with_private_modes() {
        let dir = std::env::temp_dir().join(format!("stallmesh-id-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (market, info) = init_market(&dir.join("market"), "Saturday Market").unwrap();
        assert!(matches!(init_market(&dir.join("market"), "again"), Err(FileError::Exists { .. })));
        let device = DeviceKey::generate().unwrap();
        let cert = market.enrol(device.device_id(), "Honey", crate::Role::Seller, u64::MAX);
        write_device(
            &dir.join("dev"),
            &DeviceCredentials { key: device, certificate: cert.clone(), market: info.clone(), mesh_psk: market.mesh_psk() },
        )
        .unwrap();
        let loaded = load_device(&dir.join("dev")).unwrap();
        assert_eq!(loaded.certificate, cert);
        assert_eq!(loaded.market, info);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [dir.join("market").join(MARKET_KEY_FILE), dir.join("dev").join(DEVICE_KEY_FILE), dir.join("dev").join(MESH_PSK_FILE)]
            {
                assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{p:?}");
            }
        }
        fs::write(dir.join("dev").join(DEVICE_KEY_FILE), "zz").unwrap();
        let err = load_device(&dir.join("dev")).unwrap_err().to_string();
        assert!(err.contains("device.key") && err.contains("secret key"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
