-- Drops (an organiser's limited release of one SKU, split between devices), read from the events'
-- JSON like loyalty (V2) and feedback (V3). Units sold per channel: `sale_lines` of the drop's SKU
-- whose sale's `time` is at or after `starts_at`.

CREATE VIEW drops AS
SELECT market, "offset", device AS planned_by, seq, time,
       body->>'drop_id' AS drop_id,
       body->>'name' AS name,
       body->>'sku' AS sku,
       (body->>'units')::bigint AS units,
       stallmesh_ms_to_timestamptz((body->>'start_ms')::bigint) AS starts_at,
       (body->>'max_per_buyer')::bigint AS max_per_buyer
  FROM events
 WHERE kind = 'drop';

CREATE VIEW drop_plan AS
SELECT e.market, e.body->>'drop_id' AS drop_id, p.key AS device, (p.value #>> '{}')::bigint AS units
  FROM events e, jsonb_each(e.body->'plan') p
 WHERE e.kind = 'drop';
