-- What the POS page adds to the log, read from the events' JSON like loyalty (V2): staff's
-- feedback on recommendations (training data: what staff dismissed and why, what they chose
-- instead), and which signed-in staff member made each sale.

CREATE VIEW recommendation_feedback AS
SELECT market, "offset", device, seq, time,
       body->>'action' AS action,
       body->>'sku' AS sku,
       body->>'reason' AS reason,
       body->>'chosen_sku' AS chosen_sku,
       ARRAY(SELECT jsonb_array_elements_text(body->'basket')) AS basket,
       body->>'arm' AS arm
  FROM events
 WHERE kind = 'recommendation_feedback';

CREATE VIEW sale_staff AS
SELECT market, body->>'sale_id' AS sale_id, body->>'staff' AS staff
  FROM events
 WHERE kind = 'sale' AND body ? 'staff';
