-- The cloud's reconciled logs and their relational projections (see crates/cloud/src/store/postgres.rs).
--
-- Every table is keyed by the market id (32 hex characters). Ids in hex (markets, devices, digests,
-- sale ids, SKUs) are `COLLATE "C"`: compared byte by byte, so ordering by them is the ledger's own
-- order (last writer wins on (lamport, author) compares the author's bytes), and comparisons skip
-- the locale's rules. There are no foreign keys: every row is written in the transaction that logs
-- its event, and `events` is the source of truth the others are derived from.

-- A journal time (ms since the epoch, the author's clock) as a timestamptz. A signed change may carry
-- any u64: times past the year 9999 (or the i64 the driver clamps to) are 'infinity' rather than an
-- error, so one odd clock can never stop a market's ingest.
CREATE FUNCTION stallmesh_ms_to_timestamptz(ms bigint) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN ms > 253402300799999 THEN 'infinity'::timestamptz ELSE to_timestamp(ms / 1000.0) END $$;

-- The inverse, exact to the millisecond; 'infinity' reads back as i64::MAX.
CREATE FUNCTION stallmesh_timestamptz_to_ms(t timestamptz) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN isfinite(t) THEN (extract(epoch FROM t) * 1000)::bigint ELSE 9223372036854775807 END $$;

CREATE TABLE markets (
    id                text COLLATE "C" PRIMARY KEY,
    name              text NOT NULL,
    market_public_key bytea NOT NULL,
    -- The cloud device's secret key: grant analysts the projection tables, not this one.
    device_secret     bytea NOT NULL,
    -- The cloud device's certificate, postcard.
    certificate       bytea NOT NULL,
    cloud_device      text COLLATE "C" NOT NULL,
    registered_at     timestamptz NOT NULL,
    -- The offset the next logged event gets; the log holds next_offset - 1 events. Its row lock
    -- (SELECT ... FOR UPDATE) is the market's offset lock.
    next_offset       bigint NOT NULL CHECK (next_offset >= 1)
);

-- The reconciled log: one row per accepted change, offsets 1, 2, 3, … without gaps per market.
CREATE TABLE events (
    market   text COLLATE "C" NOT NULL,
    "offset" bigint NOT NULL,
    device   text COLLATE "C" NOT NULL,
    seq      bigint NOT NULL,
    -- LogBody's "kind": enrolment, product, restock, transfer, sale, photo, revocation, cloud_watermark.
    kind     text NOT NULL,
    time     timestamptz NOT NULL,
    -- The LogEvent's body as consumers read it (GET /v1/markets/{market}/events), "kind" included.
    body     jsonb NOT NULL,
    -- The signed change and its event (postcard `Entry`): restores the ingest core exactly.
    entry    bytea NOT NULL,
    -- SHA-256 of the signed change, hex.
    digest   text COLLATE "C" NOT NULL,
    PRIMARY KEY (market, "offset"),
    UNIQUE (market, device, seq)
);

-- Devices enrolled in the market (one row per enrolment event); revoked_at is the earliest
-- revocation logged for the device, whichever arrived first.
CREATE TABLE devices (
    market        text COLLATE "C" NOT NULL,
    device        text COLLATE "C" NOT NULL,
    stall         text NOT NULL,
    -- seller, organiser or cloud.
    role          text NOT NULL,
    enrolled_at   timestamptz NOT NULL,
    -- As the certificate says; "never" (u64::MAX) is clamped to i64::MAX.
    expires_at_ms bigint NOT NULL,
    revoked_at    timestamptz,
    PRIMARY KEY (market, device)
);

-- The catalogue: per SKU the product of the highest (lamport, author), as every replica folds it.
CREATE TABLE products (
    market      text COLLATE "C" NOT NULL,
    sku         text COLLATE "C" NOT NULL,
    name        text NOT NULL,
    price_cents bigint NOT NULL,
    currency    text NOT NULL,
    stall       text NOT NULL,
    tags        text[] NOT NULL,
    lamport     bigint NOT NULL,
    author      text COLLATE "C" NOT NULL,
    PRIMARY KEY (market, sku)
);

CREATE TABLE sales (
    market      text COLLATE "C" NOT NULL,
    sale_id     text COLLATE "C" NOT NULL,
    device      text COLLATE "C" NOT NULL,
    seq         bigint NOT NULL,
    "offset"    bigint NOT NULL,
    -- The selling tablet's clock.
    time        timestamptz NOT NULL,
    total_cents bigint NOT NULL,
    currency    text NOT NULL,
    client_ref  text,
    PRIMARY KEY (market, sale_id)
);
-- Reports are per market and period (revenue per hour, per day).
CREATE INDEX sales_market_time ON sales (market, time);

CREATE TABLE sale_lines (
    market      text COLLATE "C" NOT NULL,
    sale_id     text COLLATE "C" NOT NULL,
    -- Position in the sale, from 0.
    line_no     integer NOT NULL,
    sku         text COLLATE "C" NOT NULL,
    qty         bigint NOT NULL,
    -- Unit price at the time of sale.
    price_cents bigint NOT NULL,
    PRIMARY KEY (market, sale_id, line_no)
);

CREATE TABLE restocks (
    market   text COLLATE "C" NOT NULL,
    device   text COLLATE "C" NOT NULL,
    seq      bigint NOT NULL,
    "offset" bigint NOT NULL,
    time     timestamptz NOT NULL,
    sku      text COLLATE "C" NOT NULL,
    qty      bigint NOT NULL,
    PRIMARY KEY (market, device, seq)
);

-- Stock rights moved from `device` to `to_device`.
CREATE TABLE transfers (
    market    text COLLATE "C" NOT NULL,
    device    text COLLATE "C" NOT NULL,
    seq       bigint NOT NULL,
    "offset"  bigint NOT NULL,
    time      timestamptz NOT NULL,
    sku       text COLLATE "C" NOT NULL,
    qty       bigint NOT NULL,
    to_device text COLLATE "C" NOT NULL,
    PRIMARY KEY (market, device, seq)
);

-- The market's revocation of `device`, as logged by `recorded_by` (several devices may record the
-- same revocation: each is its own event).
CREATE TABLE revocations (
    market      text COLLATE "C" NOT NULL,
    recorded_by text COLLATE "C" NOT NULL,
    seq         bigint NOT NULL,
    "offset"    bigint NOT NULL,
    device      text COLLATE "C" NOT NULL,
    revoked_at  timestamptz NOT NULL,
    PRIMARY KEY (market, recorded_by, seq)
);
-- devices.revoked_at is the earliest of a device's revocations.
CREATE INDEX revocations_market_device ON revocations (market, device);

-- What the customer was offered before a sale (arm "treatment") or would have been ("control").
CREATE TABLE recommendation_records (
    market  text COLLATE "C" NOT NULL,
    sale_id text COLLATE "C" NOT NULL,
    arm     text NOT NULL,
    skus    text[] NOT NULL,
    PRIMARY KEY (market, sale_id)
);

-- Changes the cloud refused, with the ledger's reason (the metric label) and message.
CREATE TABLE rejections (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    market  text COLLATE "C" NOT NULL,
    device  text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    reason  text NOT NULL,
    message text NOT NULL,
    -- The cloud's clock when it refused the change.
    at      timestamptz NOT NULL
);
CREATE INDEX rejections_market_at ON rejections (market, at);

-- Validly signed changes contradicting the log (a cloned tablet), kept as evidence, never logged.
CREATE TABLE evidence (
    market text COLLATE "C" NOT NULL,
    digest text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    seq    bigint NOT NULL,
    -- The SignedChange, postcard.
    change bytea NOT NULL,
    at     timestamptz NOT NULL,
    PRIMARY KEY (market, digest)
);
