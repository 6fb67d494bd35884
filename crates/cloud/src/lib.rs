//! The cloud ingest service (`stallmesh cloud up`).
//!
//! - `store/` — the embedded (redb) and PostgreSQL stores behind one `Store`.
//! - `projection.rs` — a log record as consumers read it.

pub mod projection;
pub mod store;
