//! Empty: this package holds only benchmarks (`ledger.rs`, `mesh.rs`, `inference.rs`).
