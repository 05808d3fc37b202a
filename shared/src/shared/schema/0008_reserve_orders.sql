-- The reservation rule, once (consumer/orders.py): each order reserves every line or none and
-- becomes final in the transaction. Every lock is taken up front, the orders' rows then the stock
-- rows, each in key order, so two batches never deadlock. When every order is still open and the
-- stock covers the whole batch (the usual case), all of them complete in three set-based
-- statements. Otherwise each order is a batch of one, in batch order: completed, ``duplicate`` if
-- already final (a redelivery), or rejected with the lines that are short.
-- The lines come flattened: ``p_orders[i]`` wants ``p_quantities[i]`` of ``p_skus[i]``, one line
-- per order and SKU.
CREATE OR REPLACE FUNCTION
    reserve_orders(p_orders uuid[], p_skus text[], p_quantities int[], p_by text)
RETURNS TABLE (reserved uuid, outcome text) LANGUAGE plpgsql
-- Every statement here looks rows up by key. A plan cached while ``orders`` was small (a
-- new database, statistics not gathered yet) would scan the whole table on every call.
SET enable_seqscan = off AS $$
DECLARE
    one uuid;
    current text;
    short text;
BEGIN
    PERFORM 1 FROM orders WHERE id = ANY (p_orders) ORDER BY id FOR UPDATE;
    PERFORM 1 FROM inventory WHERE sku = ANY (p_skus) ORDER BY sku FOR UPDATE;
    SELECT string_agg(
               s.sku || CASE WHEN s.available IS NULL THEN ' (unknown SKU)'
                        ELSE format(' (requested %s, available %s)', s.wanted, s.available)
                        END,
               ', ' ORDER BY s.sku)
      INTO short
      FROM (SELECT l.sku, sum(l.quantity) AS wanted, i.available
              FROM unnest(p_skus, p_quantities) AS l (sku, quantity)
              LEFT JOIN inventory i ON i.sku = l.sku
             GROUP BY l.sku, i.available) s
     WHERE s.available IS NULL OR s.available < s.wanted;
    IF short IS NULL
       AND (SELECT count(*) FROM orders WHERE id = ANY (p_orders)
               AND status NOT IN (:final_statuses))
           = (SELECT count(DISTINCT o) FROM unnest(p_orders) AS o)
    THEN
        UPDATE inventory i SET available = i.available - d.wanted,
                               updated_at = clock_timestamp()
          FROM (SELECT l.sku, sum(l.quantity) AS wanted
                  FROM unnest(p_skus, p_quantities) AS l (sku, quantity) GROUP BY l.sku) d
         WHERE i.sku = d.sku;
        INSERT INTO reservations (order_id, sku, quantity)
        SELECT * FROM unnest(p_orders, p_skus, p_quantities);
        RETURN QUERY
        UPDATE orders SET status = 'completed', reason = NULL, processed_by = p_by,
                          completed_at = clock_timestamp(), updated_at = clock_timestamp()
         WHERE id = ANY (p_orders)
        RETURNING id, 'completed'::text;
        RETURN;
    END IF;
    IF (SELECT count(DISTINCT o) FROM unnest(p_orders) AS o) > 1 THEN
        FOR one IN SELECT t.o FROM unnest(p_orders) WITH ORDINALITY AS t (o, n)
                    GROUP BY t.o ORDER BY min(t.n) LOOP
            RETURN QUERY
            SELECT r.reserved, r.outcome
              FROM (SELECT array_agg(l.sku ORDER BY l.sku) AS skus,
                           array_agg(l.quantity ORDER BY l.sku) AS quantities
                      FROM unnest(p_orders, p_skus, p_quantities) AS l (id, sku, quantity)
                     WHERE l.id = one) a,
                   reserve_orders(ARRAY[one], a.skus, a.quantities, p_by) r;
        END LOOP;
        RETURN;
    END IF;
    reserved := p_orders[1];
    SELECT status INTO current FROM orders WHERE id = reserved;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'order % does not exist', reserved;
    ELSIF current IN (:final_statuses) THEN
        outcome := 'duplicate';
    ELSE
        UPDATE orders SET status = 'rejected', reason = 'insufficient stock: ' || short,
                          processed_by = p_by, updated_at = clock_timestamp()
         WHERE id = reserved;
        outcome := 'rejected';
    END IF;
    RETURN NEXT;
END
$$;
DROP FUNCTION IF EXISTS reserve_order(uuid, text[], int[], text);
