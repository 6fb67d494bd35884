-- A market's online channel (its device of role `online`, run by the cloud) and the holds its
-- buyers place: units of that device's stock rights reserved until `expires_at_ms` unless paid
-- (`sale_id`). Holds are the cloud's own, never journal events; the sale that pays one is the
-- online device's signed journal event, in `events` and `sales` like a tablet's.

CREATE TABLE online_channels (
    market        text PRIMARY KEY REFERENCES markets (id),
    device        text NOT NULL,
    device_secret bytea NOT NULL,
    certificate   bytea NOT NULL,
    registered_at timestamptz NOT NULL
);

CREATE TABLE holds (
    market        text NOT NULL REFERENCES markets (id),
    id            text NOT NULL,
    drop_id       text NOT NULL,
    sku           text NOT NULL,
    buyer         text NOT NULL,
    qty           bigint NOT NULL CHECK (qty > 0),
    placed_at_ms  bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    sale_id       text,
    PRIMARY KEY (market, id)
);

-- What a hold decision reads under the market's lock: the SKU's unpaid holds, the buyer's holds.
CREATE INDEX holds_unpaid ON holds (market, sku, expires_at_ms) WHERE sale_id IS NULL;
CREATE INDEX holds_buyer ON holds (market, drop_id, buyer);
