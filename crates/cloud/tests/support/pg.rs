//! Connect-or-skip for tests and benchmarks against a real PostgreSQL: each caller gets a fresh,
//! empty database of its own, dropped again when the handle is dropped (also when a test panics).
//!
//! Self-contained (tokio and tokio-postgres only), so any test or bench can include it:
//! `#[path = "../crates/cloud/tests/support/pg.rs"] mod pg;`.
//!
//! The server is PostgreSQL on 127.0.0.1:5432 with trust authentication, user `postgres` or
//! `root`, database `test` (or `postgres`), unless `STALLMESH_TEST_POSTGRES` names another server
//! as a URL without a database (`postgres://user@host:port`). Not reachable: with `CI=true` the
//! caller panics (a CI run must not pass by skipping); otherwise it prints `SKIPPED: …` to stderr
//! and gets `None`.

#![allow(dead_code)] // each including test uses what it needs

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Overrides the server (a URL without a database).
pub const SERVER_ENV: &str = "STALLMESH_TEST_POSTGRES";
const DEFAULT_SERVERS: [&str; 2] = ["postgres://postgres@127.0.0.1:5432", "postgres://root@127.0.0.1:5432"];
/// Databases to connect to for CREATE DATABASE.
const ADMIN_DATABASES: [&str; 2] = ["test", "postgres"];
/// A local server answers at once; a missing one refuses at once. This bounds a firewalled one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A fresh database; `url` is what the code under test connects to.
pub struct TestDb {
    pub url: String,
    pub name: String,
    admin_url: String,
}

fn with_timeout(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}connect_timeout={}", CONNECT_TIMEOUT.as_secs())
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&with_timeout(url), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn unique_name() -> String {
    // RandomState is seeded randomly per process; the pid and the clock separate processes too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    format!("stallmesh_test_{:016x}", h.finish())
}

/// A fresh database, or `None` (after printing why) when no PostgreSQL is reachable outside CI.
/// `who` names the test in the SKIPPED line.
pub async fn fresh_database(who: &str) -> Option<TestDb> {
    let servers: Vec<String> = match std::env::var(SERVER_ENV) {
        Ok(s) if !s.trim().is_empty() => vec![s.trim().trim_end_matches('/').to_string()],
        _ => DEFAULT_SERVERS.iter().map(|s| s.to_string()).collect(),
    };
    let mut errors = Vec::new();
    for server in &servers {
        for db in ADMIN_DATABASES {
            let admin_url = format!("{server}/{db}");
            let admin = match connect(&admin_url).await {
                Ok(c) => c,
                Err(e) => {
                    let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
                    errors.push(format!("{admin_url}: {e}{cause}"));
                    continue;
                }
            };
            let name = unique_name();
            // template0: nobody is ever connected to it, so concurrent tests never collide on it.
            if let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0")).await {
                panic!("PostgreSQL at {admin_url} is up but CREATE DATABASE failed: {e:?}");
            }
            return Some(TestDb { url: format!("{server}/{name}"), name, admin_url });
        }
    }
    let why = errors.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and no PostgreSQL for {who}: {why}");
    }
    // Straight to the terminal, past the test harness's capture, which hides a passing test's eprintln!.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\n!!! SKIPPED: no PostgreSQL on 127.0.0.1:5432 (or ${SERVER_ENV}) for {who}: {why}\n\n").as_bytes(),
    );
    None
}

impl TestDb {
    /// A plain client of this database (for the tests' own queries).
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await.expect("the test database accepts connections")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // On a thread and runtime of its own: Drop cannot await, and may run inside a runtime.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async {
                let admin = connect(&admin_url).await?;
                // FORCE: the pools of the code under test may still hold connections.
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: test database {} was not dropped: {dropped:?}", self.name);
        }
    }
}
