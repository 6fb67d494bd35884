//! Helpers shared by the cloud's integration tests.

pub mod pg;
