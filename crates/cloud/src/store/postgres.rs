//! The PostgreSQL store: several cloud processes against one database. Schema: `migrations/`
//! (run on connect). Each market's log is the `events` table; its projections (`devices`,
//! `products`, `sales`, `sale_lines`, `restocks`, `transfers`, `revocations`,
//! `recommendation_records`) and the `rejections` and `evidence` are written in the same
//! transaction as the events they come from, so analysts query tables that always agree with the
//! log.
//!
//! Revenue per hour per stall of market `$1` on day `$2` (`'2024-05-04'`) in time zone `$3`
//! (`'UTC'`, `'Europe/Berlin'`: the hours and the day are the market's local ones):
//!
//! ```sql
//! SELECT date_trunc('hour', s.time AT TIME ZONE $3) AS hour,
//!        d.stall,
//!        s.currency,
//!        sum(s.total_cents) AS revenue_cents,
//!        count(*) AS sales
//!   FROM sales s
//!   JOIN devices d ON d.market = s.market AND d.device = s.device
//!  WHERE s.market = $1
//!    AND s.time >= ($2::date)::timestamp AT TIME ZONE $3
//!    AND s.time < ($2::date + 1)::timestamp AT TIME ZONE $3
//!  GROUP BY 1, 2, 3
//!  ORDER BY 1, 2, 3;
//! ```
//!
//! (`sales_market_time` serves the range; `s.time` is the selling tablet's clock.)
//!
//! Offsets are assigned under the market row's lock: [`PgStore::begin`] takes it with `SELECT …
//! FOR UPDATE`, so two processes ingesting one market take turns and different markets never wait
//! for each other. A batch is written with one multi-row `INSERT … SELECT FROM unnest(…)` per
//! table, not one statement per row.

use super::{decode_entry, encode_entry, Events, MarketRegistration, OnlineRegistration, Registered, StoreError};
use crate::projection::{log_event, role_name};
use stallmesh_shop::{Hold, HoldsRead, HoldsWanted};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use stallmesh_identity::{Certificate, DeviceId, MarketId, MarketPublicKey, SignedChange};
use stallmesh_ingest::{LogRecord, RejectedChange};
use stallmesh_ledger::{sale_id, EventBody, MarketContext, Product};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::NoTls;

mod embedded_migrations {
    refinery::embed_migrations!("migrations");
}

/// Connections per process. A batch holds one for its whole ingest (the market's row lock lives
/// in its transaction), so this bounds the markets one process ingests at the same moment; a
/// PostgreSQL of a few cores is saturated well before that.
pub const POOL_MAX_SIZE: usize = 16;
/// Opening a connection (TCP and startup): a database that does not answer in this time is
/// reported unavailable rather than holding a tablet's request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for a free pooled connection when all are busy ingesting: beyond it the request fails
/// (and the tablet retries) rather than queueing without bound.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for a market's row lock held by another process: a batch takes well under a second, so
/// this is only reached if the holder hangs; the tablet retries.
const LOCK_TIMEOUT: &str = "10s";
/// A transaction idle this long between statements is from a process that hung with the market's
/// lock (the ingest core runs between statements, for well under a second a batch): PostgreSQL
/// ends its session so other processes can go on.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";
/// Key of the session advisory lock taken around the migrations, so processes starting together
/// against one empty database run them once ("stallmesh" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x73_74_61_6c_6c_6d_65_73;

/// refinery's record of the applied migrations, named for this service so it cannot collide with
/// another refinery user of the same database.
pub const MIGRATION_TABLE: &str = "stallmesh_schema_history";

/// Read committed whatever the server's default: after waiting for a market's row lock, the next
/// statements must see what its previous holder committed.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

pub struct PgStore {
    pool: Pool,
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Any failure of the database or the connection: the caller drops its view of the market and
/// retries (a constraint violation here is a bug, and retrying reloads the log it contradicts).
fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", describe(&e)))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Unavailable(format!("PostgreSQL pool: {other}")),
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A u64 of the ledger as a bigint. Offsets and journal positions are gapless counts and never
/// reach 2^63; times and expiries may be anything a device signed, and saturate (an expiry of
/// u64::MAX, "never", reads i64::MAX; a time past year 9999 becomes 'infinity' in SQL).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative {what}: {v}")))
}

/// PostgreSQL text cannot hold NUL, which a signed product name may: replaced, so one odd string
/// cannot stop a market's ingest (the exact bytes stay in `events.entry`).
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Serialized JSON bound as `jsonb` without a detour through `serde_json::Value`.
#[derive(Debug)]
struct Jsonb(Vec<u8>);

impl Jsonb {
    fn of<T: serde::Serialize>(value: &T) -> Self {
        let bytes = serde_json::to_vec(value).expect("log bodies serialize");
        // jsonb refuses "\u0000" as well: scrub the strings the slow way on the rare body with a NUL.
        if !bytes.windows(6).any(|w| w == b"\\u0000") {
            return Jsonb(bytes);
        }
        fn scrub(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::String(s) => *s = text(s).into_owned(),
                serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
                serde_json::Value::Object(o) => {
                    let entries = std::mem::take(o);
                    for (k, mut v) in entries {
                        scrub(&mut v);
                        o.insert(text(&k).into_owned(), v);
                    }
                }
                _ => {}
            }
        }
        let mut v = serde_json::to_value(value).expect("log bodies serialize");
        scrub(&mut v);
        Jsonb(serde_json::to_vec(&v).expect("JSON values serialize"))
    }
}

impl ToSql for Jsonb {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]); // jsonb's binary format: version 1, then the text
        }
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

impl PgStore {
    /// Opens the pool and brings the schema up to date. Processes starting together take turns
    /// (an advisory lock) so the migrations run once.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Unavailable(format!("PostgreSQL URL: {}", describe(&e))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        migrate(&config).await?;
        // Fast: a connection is reused if it is open. A transaction left open is never returned
        // (see `Conn`), so there is nothing to clean on checkout.
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_MAX_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL pool: {e}")))?;
        Ok(Self { pool })
    }

    async fn conn(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// A transaction on a pooled connection, rolled back unless committed.
    async fn transaction(&self) -> Result<Conn, StoreError> {
        let conn = Conn::new(self.conn().await?);
        conn.client().batch_execute(&format!(
            "{BEGIN}; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; SET LOCAL idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'"
        ))
        .await
        .map_err(pg)?;
        Ok(conn)
    }

    pub async fn register(&self, reg: &MarketRegistration, first: &[LogRecord]) -> Result<Registered, StoreError> {
        debug_assert!(first.iter().enumerate().all(|(i, r)| r.offset == 1 + i as u64), "a log starts at offset 1");
        let market = reg.market.to_hex();
        let mut tx = self.transaction().await?;
        let c = tx.client();
        let insert = c
            .prepare_cached(
                "INSERT INTO markets (id, name, market_public_key, device_secret, certificate, cloud_device, registered_at, next_offset) \
                 VALUES ($1, $2, $3, $4, $5, $6, stallmesh_ms_to_timestamptz($7), $8) ON CONFLICT (id) DO NOTHING",
            )
            .await
            .map_err(pg)?;
        let certificate = postcard::to_allocvec(&reg.certificate).expect("certificates serialize");
        let cloud_device = reg.certificate.device.to_hex();
        let next_offset = int(1 + first.len() as u64);
        // Two processes registering one market at once: the second waits for the first's insert
        // to commit, then finds its row.
        let inserted = c
            .execute(
                &insert,
                &[
                    &market,
                    &text(&reg.name),
                    &&reg.market_key.0[..],
                    &&reg.device_secret[..],
                    &certificate,
                    &cloud_device,
                    &int(reg.registered_at_ms),
                    &next_offset,
                ],
            )
            .await
            .map_err(pg)?;
        if inserted == 0 {
            let row = c.query_one("SELECT cloud_device FROM markets WHERE id = $1", &[&market]).await.map_err(pg)?;
            let existing: String = row.get(0);
            tx.rollback().await;
            return if existing == cloud_device { Ok(Registered::Already) } else { Err(StoreError::Conflict(reg.market)) };
        }
        write_batch(c, &reg.market, first, &[], &[], reg.registered_at_ms).await?;
        tx.commit().await?;
        Ok(Registered::New)
    }

    pub async fn markets(&self) -> Result<Vec<MarketRegistration>, StoreError> {
        let c = self.conn().await?;
        let rows = c.query(&format!("{MARKET_COLUMNS} ORDER BY id"), &[]).await.map_err(pg)?;
        rows.iter().map(registration).collect()
    }

    pub async fn market(&self, market: &MarketId) -> Result<Option<MarketRegistration>, StoreError> {
        let c = self.conn().await?;
        let stmt = c.prepare_cached(&format!("{MARKET_COLUMNS} WHERE id = $1")).await.map_err(pg)?;
        let row = c.query_opt(&stmt, &[&market.to_hex()]).await.map_err(pg)?;
        row.as_ref().map(registration).transpose()
    }

    pub async fn load_log(&self, market: &MarketId, after: u64) -> Result<Vec<LogRecord>, StoreError> {
        let c = self.conn().await?;
        load_records(&c, market, after, usize::MAX).await
    }

    pub async fn events(&self, market: &MarketId, after: u64, limit: usize) -> Result<Events, StoreError> {
        // Mapped from the stored entries exactly as the embedded store does: the same JSON either way.
        let c = self.conn().await?;
        let records = load_records(&c, market, after, limit).await?;
        Ok(records.iter().map(|r| log_event(market, r)).collect())
    }

    pub async fn next_offset(&self, market: &MarketId) -> Result<u64, StoreError> {
        let c = self.conn().await?;
        let stmt = c.prepare_cached("SELECT next_offset FROM markets WHERE id = $1").await.map_err(pg)?;
        let row = c.query_opt(&stmt, &[&market.to_hex()]).await.map_err(pg)?;
        uint(row.ok_or(StoreError::UnknownMarket(*market))?.get(0), "next offset")
    }

    /// Takes the market's row lock (waiting while another process holds it) and reads its next
    /// offset under it.
    pub async fn begin(&self, market: &MarketId) -> Result<PgTx, StoreError> {
        let mut conn = self.transaction().await?;
        let c = conn.client();
        let stmt = c.prepare_cached("SELECT next_offset FROM markets WHERE id = $1 FOR UPDATE").await.map_err(pg)?;
        let row = c.query_opt(&stmt, &[&market.to_hex()]).await.map_err(pg)?;
        let Some(row) = row else {
            conn.rollback().await;
            return Err(StoreError::UnknownMarket(*market));
        };
        let next_offset = uint(row.get(0), "next offset")?;
        Ok(PgTx { conn: Some(Box::new(conn)), market: *market, next_offset })
    }
}

impl PgStore {
    pub async fn online(&self, market: &MarketId) -> Result<Option<OnlineRegistration>, StoreError> {
        let c = self.conn().await?;
        let stmt = c.prepare_cached("SELECT device_secret, certificate FROM online_channels WHERE market = $1").await.map_err(pg)?;
        let Some(row) = c.query_opt(&stmt, &[&market.to_hex()]).await.map_err(pg)? else { return Ok(None) };
        let device_secret: [u8; 32] =
            row.get::<_, &[u8]>(0).try_into().map_err(|_| corrupt(format!("market {market}: online device secret of the wrong length")))?;
        let certificate: Certificate =
            postcard::from_bytes(row.get::<_, &[u8]>(1)).map_err(|e| corrupt(format!("market {market}: online certificate: {e}")))?;
        Ok(Some(OnlineRegistration { device_secret, certificate }))
    }

    pub async fn set_online(&self, market: &MarketId, online: &OnlineRegistration, now_ms: u64) -> Result<Registered, StoreError> {
        let c = self.conn().await?;
        let device = online.certificate.device.to_hex();
        let certificate = postcard::to_allocvec(&online.certificate).expect("certificates serialize");
        let inserted = c
            .execute(
                "INSERT INTO online_channels (market, device, device_secret, certificate, registered_at) \
                 SELECT $1, $2, $3, $4, stallmesh_ms_to_timestamptz($5) WHERE EXISTS (SELECT 1 FROM markets WHERE id = $1) \
                 ON CONFLICT (market) DO NOTHING",
                &[&market.to_hex(), &device, &&online.device_secret[..], &certificate, &int(now_ms)],
            )
            .await
            .map_err(pg)?;
        if inserted == 1 {
            return Ok(Registered::New);
        }
        let row = c.query_opt("SELECT device FROM online_channels WHERE market = $1", &[&market.to_hex()]).await.map_err(pg)?;
        match row {
            None => Err(StoreError::UnknownMarket(*market)),
            Some(r) if r.get::<_, &str>(0) == device => Ok(Registered::Already),
            Some(_) => Err(StoreError::Conflict(*market)),
        }
    }
}

fn hold_row(row: &tokio_postgres::Row) -> Result<Hold, StoreError> {
    Ok(Hold {
        id: row.get(0),
        drop: row.get(1),
        sku: row.get(2),
        buyer: row.get(3),
        qty: uint(row.get(4), "hold quantity")?,
        placed_ms: uint(row.get(5), "hold time")?,
        expires_ms: uint(row.get(6), "hold expiry")?,
        sale: row.get(7),
    })
}

const MARKET_COLUMNS: &str = "SELECT id, name, market_public_key, device_secret, certificate, \
                              stallmesh_timestamptz_to_ms(registered_at) FROM markets";

fn registration(row: &tokio_postgres::Row) -> Result<MarketRegistration, StoreError> {
    let id: &str = row.get(0);
    let market = MarketId::from_hex(id).map_err(|e| corrupt(format!("market id {id:?}: {e}")))?;
    let key: [u8; 32] = row.get::<_, &[u8]>(2).try_into().map_err(|_| corrupt(format!("market {id}: public key of the wrong length")))?;
    let market_key = MarketPublicKey(key);
    if MarketContext::new(market_key).market != market {
        return Err(corrupt(format!("market {id}: the public key is of another market")));
    }
    let device_secret: [u8; 32] =
        row.get::<_, &[u8]>(3).try_into().map_err(|_| corrupt(format!("market {id}: device secret of the wrong length")))?;
    let certificate: Certificate =
        postcard::from_bytes(row.get::<_, &[u8]>(4)).map_err(|e| corrupt(format!("market {id}: certificate: {e}")))?;
    Ok(MarketRegistration {
        market,
        name: row.get(1),
        market_key,
        device_secret,
        certificate,
        registered_at_ms: uint(row.get(5), "registration time")?,
    })
}

async fn load_records(
    c: &deadpool_postgres::ClientWrapper,
    market: &MarketId,
    after: u64,
    limit: usize,
) -> Result<Vec<LogRecord>, StoreError> {
    let stmt = c
        .prepare_cached("SELECT \"offset\", entry FROM events WHERE market = $1 AND \"offset\" > $2 ORDER BY \"offset\" LIMIT $3")
        .await
        .map_err(pg)?;
    let rows = c.query(&stmt, &[&market.to_hex(), &int(after), &i64::try_from(limit).unwrap_or(i64::MAX)]).await.map_err(pg)?;
    rows.iter().map(|row| Ok(LogRecord { offset: uint(row.get(0), "offset")?, entry: decode_entry(row.get::<_, &[u8]>(1))? })).collect()
}

/// A pooled connection inside a transaction. Returned to the pool only once the transaction is
/// over (committed or rolled back); dropped in any other state, it is detached from the pool and
/// closed, which makes PostgreSQL roll back and release the market's lock.
struct Conn {
    obj: Option<Object>,
    clean: bool,
}

impl Conn {
    fn new(obj: Object) -> Self {
        Self { obj: Some(obj), clean: false }
    }

    fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.obj.as_ref().expect("held until dropped")
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        self.client().batch_execute("COMMIT").await.map_err(pg)?;
        self.clean = true;
        Ok(())
    }

    /// Rolls back; on failure the connection is discarded when dropped.
    async fn rollback(&mut self) {
        if self.client().batch_execute("ROLLBACK").await.is_ok() {
            self.clean = true;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let (false, Some(obj)) = (self.clean, self.obj.take()) {
            // Closing the connection aborts its transaction server-side.
            drop(Object::take(obj));
        }
    }
}

/// A market's row lock, held until [`PgTx::commit`] or drop.
pub struct PgTx {
    /// Boxed: a pooled connection is large, and a `MarketTx` is moved around by value.
    conn: Option<Box<Conn>>,
    market: MarketId,
    next_offset: u64,
}

impl PgTx {
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.conn.as_ref().expect("held until commit or drop").client()
    }

    /// Records with offset > `after`, committed by whoever held the lock before.
    pub async fn load_after(&mut self, after: u64) -> Result<Vec<LogRecord>, StoreError> {
        load_records(self.client(), &self.market, after, usize::MAX).await
    }

    /// Three statements sent together (pipelined: one round trip), each served by an index: the
    /// holds named by id (the primary key), the SKUs' held units (`holds_unpaid`), the buyers'
    /// units of their drops (`holds_buyer`).
    pub async fn holds_for(&mut self, wanted: &HoldsWanted, now_ms: u64) -> Result<HoldsRead, StoreError> {
        let c = self.client();
        let market = self.market.to_hex();
        let now = int(now_ms);
        let ids: Vec<&str> = wanted.ids.iter().map(String::as_str).collect();
        let skus: Vec<&str> = wanted.skus.iter().map(String::as_str).collect();
        let drops: Vec<&str> = wanted.buyers.iter().map(|(d, _)| d.as_str()).collect();
        let buyers: Vec<&str> = wanted.buyers.iter().map(|(_, b)| b.as_str()).collect();
        let by_id = async {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let stmt = c
                .prepare_cached("SELECT id, drop_id, sku, buyer, qty, placed_at_ms, expires_at_ms, sale_id FROM holds WHERE market = $1 AND id = ANY($2)")
                .await?;
            c.query(&stmt, &[&market, &ids]).await
        };
        let held = async {
            if skus.is_empty() {
                return Ok(Vec::new());
            }
            let stmt = c
                .prepare_cached(
                    "SELECT sku, SUM(qty)::bigint, MIN(expires_at_ms) FROM holds \
                      WHERE market = $1 AND sku = ANY($2) AND sale_id IS NULL AND expires_at_ms > $3 GROUP BY sku",
                )
                .await?;
            c.query(&stmt, &[&market, &skus, &now]).await
        };
        let of_buyers = async {
            if buyers.is_empty() {
                return Ok(Vec::new());
            }
            let stmt = c
                .prepare_cached(
                    "SELECT h.drop_id, h.buyer, SUM(h.qty)::bigint FROM holds h \
                       JOIN UNNEST($2::text[], $3::text[]) AS b (drop_id, buyer) ON h.drop_id = b.drop_id AND h.buyer = b.buyer \
                      WHERE h.market = $1 AND (h.sale_id IS NOT NULL OR h.expires_at_ms > $4) GROUP BY h.drop_id, h.buyer",
                )
                .await?;
            c.query(&stmt, &[&market, &drops, &buyers, &now]).await
        };
        let (by_id, held, of_buyers) = tokio::try_join!(by_id, held, of_buyers).map_err(pg)?;
        let mut read = HoldsRead { holds: by_id.iter().map(hold_row).collect::<Result<_, _>>()?, ..Default::default() };
        for row in &held {
            let expiry = row.get::<_, Option<i64>>(2).map(|t| uint(t, "hold expiry")).transpose()?;
            read.held.insert(row.get::<_, String>(0), (uint(row.get(1), "held units")?, expiry));
        }
        for row in &of_buyers {
            read.buyers.insert((row.get::<_, String>(0), row.get::<_, String>(1)), uint(row.get(2), "buyer's units")?);
        }
        Ok(read)
    }

    /// Writes the batch and the new next offset, and commits (releasing the market's lock).
    pub async fn commit(
        mut self,
        records: &[LogRecord],
        rejected: &[RejectedChange],
        evidence: &[SignedChange],
        holds: &[Hold],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if let Some(first) = records.first() {
            if first.offset != self.next_offset {
                return Err(StoreError::OffsetMoved { market: self.market, expected: first.offset, found: self.next_offset });
            }
        }
        let c = self.client();
        write_batch(c, &self.market, records, rejected, evidence, now_ms).await?;
        if !holds.is_empty() {
            // One statement for a whole checkout batch (ids are distinct: a batch writes each once).
            let col = |f: fn(&Hold) -> &str| holds.iter().map(f).collect::<Vec<&str>>();
            let num = |f: fn(&Hold) -> u64| holds.iter().map(|h| int(f(h))).collect::<Vec<i64>>();
            let sale: Vec<Option<&str>> = holds.iter().map(|h| h.sale.as_deref()).collect();
            exec(
                c,
                "INSERT INTO holds (market, id, drop_id, sku, buyer, qty, placed_at_ms, expires_at_ms, sale_id) \
                 SELECT $1, i, d, s, b, q, p, x, sa \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::text[]) \
                 AS u(i, d, s, b, q, p, x, sa) \
                 ON CONFLICT (market, id) DO UPDATE SET sale_id = EXCLUDED.sale_id",
                &[
                    &self.market.to_hex(),
                    &col(|h| &h.id),
                    &col(|h| &h.drop),
                    &col(|h| &h.sku),
                    &col(|h| &h.buyer),
                    &num(|h| h.qty),
                    &num(|h| h.placed_ms),
                    &num(|h| h.expires_ms),
                    &sale,
                ],
            )
            .await?;
        }
        if !records.is_empty() {
            let stmt = c
                .prepare_cached("UPDATE markets SET next_offset = next_offset + $2 WHERE id = $1 RETURNING next_offset")
                .await
                .map_err(pg)?;
            let row = c.query_one(&stmt, &[&self.market.to_hex(), &int(records.len() as u64)]).await.map_err(pg)?;
            let found = uint(row.get(0), "next offset")?;
            let expected = self.next_offset + records.len() as u64;
            if found != expected {
                // Unreachable while the row lock is held: refuse rather than commit a forked log.
                return Err(StoreError::OffsetMoved { market: self.market, expected, found: found - records.len() as u64 });
            }
        }
        self.conn.as_mut().expect("held until commit or drop").commit().await
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        if conn.clean {
            return;
        }
        // Roll back on the runtime so the connection goes back to the pool; without one (or if
        // the task is dropped at shutdown), `Conn`'s own drop closes the connection instead.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { conn.rollback().await });
        }
    }
}

/// The columns of one batch, one vector per column, bound as arrays and unnested server-side.
#[derive(Default)]
struct Columns<'a> {
    ev_offset: Vec<i64>,
    ev_device: Vec<String>,
    ev_seq: Vec<i64>,
    ev_kind: Vec<&'static str>,
    ev_time: Vec<i64>,
    ev_body: Vec<Jsonb>,
    ev_entry: Vec<Vec<u8>>,
    ev_digest: Vec<String>,

    dev_device: Vec<String>,
    dev_stall: Vec<Cow<'a, str>>,
    dev_role: Vec<&'static str>,
    dev_time: Vec<i64>,
    dev_expires: Vec<i64>,

    /// sku → the batch's winning write (highest (lamport, author)), as [`stallmesh_ledger::State`] folds.
    products: BTreeMap<&'a str, (u64, DeviceId, &'a Product)>,

    sale_id: Vec<String>,
    sale_device: Vec<String>,
    sale_seq: Vec<i64>,
    sale_offset: Vec<i64>,
    sale_time: Vec<i64>,
    sale_total: Vec<i64>,
    sale_currency: Vec<Cow<'a, str>>,
    sale_client_ref: Vec<Option<Cow<'a, str>>>,

    line_sale: Vec<String>,
    line_no: Vec<i32>,
    line_sku: Vec<Cow<'a, str>>,
    line_qty: Vec<i64>,
    line_price: Vec<i64>,

    rec_sale: Vec<String>,
    rec_arm: Vec<Cow<'a, str>>,
    rec_skus: Vec<Jsonb>,

    /// Restocks and transfers share their columns; `to_device` is the transfers' own.
    stock: [StockColumns<'a>; 2],
    to_device: Vec<String>,

    rev_by: Vec<String>,
    rev_seq: Vec<i64>,
    rev_offset: Vec<i64>,
    rev_device: Vec<String>,
    rev_at: Vec<i64>,
}

#[derive(Default)]
struct StockColumns<'a> {
    device: Vec<String>,
    seq: Vec<i64>,
    offset: Vec<i64>,
    time: Vec<i64>,
    sku: Vec<Cow<'a, str>>,
    qty: Vec<i64>,
}

impl<'a> StockColumns<'a> {
    fn push(&mut self, device: &str, seq: u64, offset: u64, time_ms: u64, sku: &'a str, qty: u64) {
        self.device.push(device.to_string());
        self.seq.push(int(seq));
        self.offset.push(int(offset));
        self.time.push(int(time_ms));
        self.sku.push(text(sku));
        self.qty.push(int(qty));
    }
}

impl<'a> Columns<'a> {
    fn of(market: &MarketId, records: &'a [LogRecord]) -> Self {
        let mut c = Columns::default();
        for r in records {
            let change = &r.entry.change;
            let time_ms = r.entry.event.time_ms;
            let event = log_event(market, r);
            let device = event.device;
            let (offset, seq, time) = (int(r.offset), int(change.seq), int(time_ms));
            match &r.entry.event.body {
                EventBody::Enrolled { certificate } => {
                    c.dev_device.push(device.clone());
                    c.dev_stall.push(text(&certificate.stall));
                    c.dev_role.push(role_name(certificate.role));
                    c.dev_time.push(time);
                    c.dev_expires.push(int(certificate.expires_at_ms));
                }
                EventBody::ProductUpserted { product, lamport } => {
                    let candidate = (*lamport, change.device, &**product);
                    c.products
                        .entry(&product.sku)
                        .and_modify(|cur| {
                            if (candidate.0, candidate.1) > (cur.0, cur.1) {
                                *cur = candidate;
                            }
                        })
                        .or_insert(candidate);
                }
                EventBody::Restocked { sku, qty } => c.stock[0].push(&device, change.seq, r.offset, time_ms, sku, *qty),
                EventBody::Transferred { sku, qty, to } => {
                    c.stock[1].push(&device, change.seq, r.offset, time_ms, sku, *qty);
                    c.to_device.push(to.to_hex());
                }
                // A sale's loyalty is in `events.body` (its `loyalty` object) until loyalty has tables.
                EventBody::Sold { lines, total_cents, currency, client_ref, recommendation, .. } => {
                    let id = sale_id(change.dot());
                    for (i, l) in lines.iter().enumerate() {
                        c.line_sale.push(id.clone());
                        c.line_no.push(i32::try_from(i).expect("a sale has at most MAX_SALE_LINES lines"));
                        c.line_sku.push(text(&l.sku));
                        c.line_qty.push(int(l.qty));
                        c.line_price.push(int(l.price_cents));
                    }
                    if let Some(rec) = recommendation {
                        c.rec_sale.push(id.clone());
                        c.rec_arm.push(text(&rec.arm));
                        c.rec_skus.push(Jsonb::of(&rec.skus));
                    }
                    c.sale_id.push(id);
                    c.sale_device.push(device.clone());
                    c.sale_seq.push(seq);
                    c.sale_offset.push(offset);
                    c.sale_time.push(time);
                    c.sale_total.push(int(*total_cents));
                    c.sale_currency.push(text(currency));
                    c.sale_client_ref.push(client_ref.as_deref().map(text));
                }
                EventBody::Revoked { revocation } => {
                    c.rev_by.push(device.clone());
                    c.rev_seq.push(seq);
                    c.rev_offset.push(offset);
                    c.rev_device.push(revocation.device.to_hex());
                    c.rev_at.push(int(revocation.revoked_at_ms));
                }
                // Kept in `events` only: photos are served from the ledger, watermarks are the cloud's own.
                // Loyalty events too, until loyalty has tables of its own.
                EventBody::PhotoAttached { .. }
                | EventBody::CloudHolds { .. }
                | EventBody::LoyaltyTransferred { .. }
                | EventBody::VoucherMinted { .. }
                | EventBody::VoucherRedeemed { .. }
                // Feedback is read from `events` by the view `recommendation_feedback` (V3).
                | EventBody::RecommendationFeedback { .. }
                // Drops by the views `drops` and `drop_plan` (V4).
                | EventBody::DropPlanned { .. } => {}
            }
            c.ev_offset.push(offset);
            c.ev_device.push(device);
            c.ev_seq.push(seq);
            c.ev_kind.push(event.body.kind());
            c.ev_time.push(time);
            c.ev_body.push(Jsonb::of(&event.body));
            c.ev_entry.push(encode_entry(&r.entry));
            c.ev_digest.push(event.digest);
        }
        c
    }
}

/// Runs one prepared (and per-connection cached) statement.
async fn exec(c: &deadpool_postgres::ClientWrapper, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
    let stmt = c.prepare_cached(sql).await.map_err(pg)?;
    c.execute(&stmt, params).await.map_err(pg)
}

/// Inserts the batch's events, projections, rejections and evidence (the caller's transaction).
async fn write_batch(
    c: &deadpool_postgres::ClientWrapper,
    market: &MarketId,
    records: &[LogRecord],
    rejected: &[RejectedChange],
    evidence: &[SignedChange],
    now_ms: u64,
) -> Result<(), StoreError> {
    let m = market.to_hex();
    let cols = Columns::of(market, records);
    if !records.is_empty() {
        exec(
            c,
            "INSERT INTO events (market, \"offset\", device, seq, kind, time, body, entry, digest) \
             SELECT $1, o, d, s, k, stallmesh_ms_to_timestamptz(t), b, e, g \
             FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::bigint[], $7::jsonb[], $8::bytea[], $9::text[]) \
             AS u(o, d, s, k, t, b, e, g)",
            &[
                &m,
                &cols.ev_offset,
                &cols.ev_device,
                &cols.ev_seq,
                &cols.ev_kind,
                &cols.ev_time,
                &cols.ev_body,
                &cols.ev_entry,
                &cols.ev_digest,
            ],
        )
        .await?;
    }
    if !cols.dev_device.is_empty() {
        exec(
            c,
            "INSERT INTO devices (market, device, stall, role, enrolled_at, expires_at_ms) \
             SELECT $1, d, st, r, stallmesh_ms_to_timestamptz(t), x \
             FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[]) AS u(d, st, r, t, x) \
             ON CONFLICT (market, device) DO NOTHING",
            &[&m, &cols.dev_device, &cols.dev_stall, &cols.dev_role, &cols.dev_time, &cols.dev_expires],
        )
        .await?;
    }
    if !cols.rev_by.is_empty() {
        exec(
            c,
            "INSERT INTO revocations (market, recorded_by, seq, \"offset\", device, revoked_at) \
             SELECT $1, b, s, o, d, stallmesh_ms_to_timestamptz(t) \
             FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[]) AS u(b, s, o, d, t) \
             ON CONFLICT DO NOTHING",
            &[&m, &cols.rev_by, &cols.rev_seq, &cols.rev_offset, &cols.rev_device, &cols.rev_at],
        )
        .await?;
    }
    if !cols.rev_device.is_empty() || !cols.dev_device.is_empty() {
        // The earliest revocation wins whichever arrived first, and one logged before the device's
        // enrolment applies once the enrolment arrives.
        let touched: Vec<&String> = cols.rev_device.iter().chain(&cols.dev_device).collect();
        exec(
            c,
            "UPDATE devices d SET revoked_at = r.at \
             FROM (SELECT device, min(revoked_at) AS at FROM revocations WHERE market = $1 AND device = ANY($2::text[]) GROUP BY device) r \
             WHERE d.market = $1 AND d.device = r.device AND d.revoked_at IS DISTINCT FROM r.at",
            &[&m, &touched],
        )
        .await?;
    }
    if !cols.products.is_empty() {
        let mut sku = Vec::new();
        let mut name = Vec::new();
        let mut price = Vec::new();
        let mut currency = Vec::new();
        let mut stall = Vec::new();
        let mut tags = Vec::new();
        let mut lamport = Vec::new();
        let mut author = Vec::new();
        for (lam, by, p) in cols.products.values() {
            sku.push(text(&p.sku));
            name.push(text(&p.name));
            price.push(int(p.price_cents));
            currency.push(text(&p.currency));
            stall.push(text(&p.stall));
            tags.push(Jsonb::of(&p.tags));
            lamport.push(int(*lam));
            author.push(by.to_hex());
        }
        // Last writer wins on (lamport, author), compared byte by byte (author is COLLATE "C").
        exec(
            c,
            "INSERT INTO products (market, sku, name, price_cents, currency, stall, tags, lamport, author) \
             SELECT $1, k, n, p, c, st, ARRAY(SELECT t FROM jsonb_array_elements_text(tg) WITH ORDINALITY AS a(t, i) ORDER BY i), l, a \
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::jsonb[], $8::bigint[], $9::text[]) \
             AS u(k, n, p, c, st, tg, l, a) \
             ON CONFLICT (market, sku) DO UPDATE SET name = EXCLUDED.name, price_cents = EXCLUDED.price_cents, \
             currency = EXCLUDED.currency, stall = EXCLUDED.stall, tags = EXCLUDED.tags, lamport = EXCLUDED.lamport, author = EXCLUDED.author \
             WHERE (EXCLUDED.lamport, EXCLUDED.author) > (products.lamport, products.author)",
            &[&m, &sku, &name, &price, &currency, &stall, &tags, &lamport, &author],
        )
        .await?;
    }
    if !cols.sale_id.is_empty() {
        exec(
            c,
            "INSERT INTO sales (market, sale_id, device, seq, \"offset\", time, total_cents, currency, client_ref) \
             SELECT $1, i, d, s, o, stallmesh_ms_to_timestamptz(t), tc, c, r \
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], $9::text[]) \
             AS u(i, d, s, o, t, tc, c, r)",
            &[
                &m,
                &cols.sale_id,
                &cols.sale_device,
                &cols.sale_seq,
                &cols.sale_offset,
                &cols.sale_time,
                &cols.sale_total,
                &cols.sale_currency,
                &cols.sale_client_ref,
            ],
        )
        .await?;
        exec(
            c,
            "INSERT INTO sale_lines (market, sale_id, line_no, sku, qty, price_cents) \
             SELECT $1, i, n, k, q, p FROM unnest($2::text[], $3::int[], $4::text[], $5::bigint[], $6::bigint[]) AS u(i, n, k, q, p)",
            &[&m, &cols.line_sale, &cols.line_no, &cols.line_sku, &cols.line_qty, &cols.line_price],
        )
        .await?;
    }
    if !cols.rec_sale.is_empty() {
        exec(
            c,
            "INSERT INTO recommendation_records (market, sale_id, arm, skus) \
             SELECT $1, i, a, ARRAY(SELECT t FROM jsonb_array_elements_text(k) WITH ORDINALITY AS e(t, n) ORDER BY n) \
             FROM unnest($2::text[], $3::text[], $4::jsonb[]) AS u(i, a, k)",
            &[&m, &cols.rec_sale, &cols.rec_arm, &cols.rec_skus],
        )
        .await?;
    }
    for (table, s, to) in [("restocks", &cols.stock[0], None), ("transfers", &cols.stock[1], Some(&cols.to_device))] {
        if s.device.is_empty() {
            continue;
        }
        let (column, value, ty) = if to.is_some() { (", to_device", ", x", ", $8::text[]") } else { ("", "", "") };
        let sql = format!(
            "INSERT INTO {table} (market, device, seq, \"offset\", time, sku, qty{column}) \
             SELECT $1, d, s, o, stallmesh_ms_to_timestamptz(t), k, q{value} \
             FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[]{ty}) AS u(d, s, o, t, k, q{value})"
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&m, &s.device, &s.seq, &s.offset, &s.time, &s.sku, &s.qty];
        if let Some(to) = to {
            params.push(to);
        }
        exec(c, &sql, &params).await?;
    }
    if !rejected.is_empty() {
        let device: Vec<String> = rejected.iter().map(|r| r.device.to_hex()).collect();
        let seq: Vec<i64> = rejected.iter().map(|r| int(r.seq)).collect();
        let reason: Vec<Cow<str>> = rejected.iter().map(|r| text(&r.reason)).collect();
        let message: Vec<Cow<str>> = rejected.iter().map(|r| text(&r.message)).collect();
        exec(
            c,
            "INSERT INTO rejections (market, device, seq, reason, message, at) \
             SELECT $1, d, s, r, g, stallmesh_ms_to_timestamptz($6) FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[]) AS u(d, s, r, g)",
            &[&m, &device, &seq, &reason, &message, &int(now_ms)],
        )
        .await?;
    }
    if !evidence.is_empty() {
        let digest: Vec<String> = evidence.iter().map(|e| e.digest().to_hex()).collect();
        let device: Vec<String> = evidence.iter().map(|e| e.device.to_hex()).collect();
        let seq: Vec<i64> = evidence.iter().map(|e| int(e.seq)).collect();
        let change: Vec<Vec<u8>> = evidence.iter().map(|e| postcard::to_allocvec(e).expect("changes serialize")).collect();
        exec(
            c,
            "INSERT INTO evidence (market, digest, device, seq, change, at) \
             SELECT $1, g, d, s, c, stallmesh_ms_to_timestamptz($6) FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bytea[]) AS u(g, d, s, c) \
             ON CONFLICT (market, digest) DO NOTHING",
            &[&m, &digest, &device, &seq, &change, &int(now_ms)],
        )
        .await?;
    }
    Ok(())
}

/// Brings the schema up to date on a connection of its own, under a session advisory lock (freed
/// when the connection closes, whatever happens).
async fn migrate(config: &tokio_postgres::Config) -> Result<(), StoreError> {
    let (mut client, connection) = config.connect(NoTls).await.map_err(pg)?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "PostgreSQL migration connection ended");
        }
    });
    let result = async {
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).await.map_err(pg)?;
        let report = embedded_migrations::migrations::runner()
            .set_migration_table_name(MIGRATION_TABLE)
            .run_async(&mut client)
            .await
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL migrations: {e}")))?;
        for m in report.applied_migrations() {
            tracing::info!(migration = %m, "PostgreSQL migration applied");
        }
        client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).await.map_err(pg)?;
        Ok(())
    }
    .await;
    drop(client);
    let _ = task.await;
    result
}
