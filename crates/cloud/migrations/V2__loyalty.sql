-- Loyalty as the reconciled log holds it, read from the events' JSON (a sale's "loyalty" object,
-- "voucher_minted", "voucher_redeemed" and "loyalty_transfer" events): nothing is written twice,
-- and the views follow the log as it grows. The rules are the tablets' own (crates/ledger/src/loyalty.rs):
-- a card is exposed by the points redeemed beyond what it earned in all; a voucher by its
-- redemptions beyond one.

-- Every card seen in a sale, with its totals.
CREATE VIEW loyalty_cards AS
SELECT market,
       body->'loyalty'->>'card' AS card,
       sum((body->'loyalty'->>'points_earned')::bigint)::bigint AS points_earned,
       sum((body->'loyalty'->>'points_redeemed')::bigint)::bigint AS points_redeemed,
       sum((body->'loyalty'->>'points_unproven')::bigint)::bigint AS points_unproven,
       sum((body->'loyalty'->>'discount_cents')::bigint)::bigint AS discount_cents,
       count(*) AS sales
  FROM events
 WHERE kind = 'sale' AND body ? 'loyalty'
 GROUP BY market, body->'loyalty'->>'card';

-- Points and vouchers spent twice (under a partition), with how many redemptions did it.
CREATE VIEW loyalty_exposures AS
SELECT market, 'points'::text AS asset, card AS id,
       points_redeemed + points_unproven - points_earned AS units
  FROM loyalty_cards
 WHERE points_redeemed + points_unproven > points_earned
UNION ALL
SELECT market, 'voucher'::text, body->>'voucher', count(*) - 1
  FROM events
 WHERE kind = 'voucher_redeemed'
 GROUP BY market, body->>'voucher'
HAVING count(*) > 1;
