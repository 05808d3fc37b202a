-- Every change of an order's status is an event (docs/notifications.md), written by triggers in
-- the transaction that makes the change: none for a change rolled back, none lost once it has
-- committed, whichever process made it (the API, a consumer, a replay, another AMQP client's
-- order). The functions run as the schema's owner, so the services' roles may read events but
-- never write one.
ALTER TABLE orders ADD COLUMN api_key text;  -- the name of the API key that submitted it

CREATE TABLE order_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Streams read events in (tx, id) order and only those of transactions that have ended
    -- (tx below the oldest one still running): an event is never read after a later one.
    tx              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    order_id        uuid NOT NULL,
    api_key         text,
    type            text NOT NULL CHECK (type IN
                      ('accepted','processing','retrying','completed','rejected','failed',
                       'replayed')),
    status          text NOT NULL,
    attempts        integer NOT NULL,
    reason          text,
    next_attempt_at timestamptz,
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX order_events_position ON order_events (tx, id);
CREATE INDEX order_events_order ON order_events (order_id, tx, id);

-- A new order, a change of status, or a new attempt (a redelivery starts the order again); an
-- order that leaves ``failed`` was replayed from the dead-letter queue. One notification per
-- transaction that wrote events (equal payloads are folded at commit).
CREATE FUNCTION order_events_written() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO order_events (order_id, api_key, type, status, attempts, reason,
                                  next_attempt_at)
        SELECT id, api_key, status, status, attempts, reason, next_attempt_at FROM new_rows;
    ELSE
        INSERT INTO order_events (order_id, api_key, type, status, attempts, reason,
                                  next_attempt_at)
        SELECT n.id, n.api_key,
               CASE WHEN o.status = 'failed' AND n.status <> 'failed' THEN 'replayed'
                    ELSE n.status END,
               n.status, n.attempts, n.reason, n.next_attempt_at
          FROM new_rows n JOIN old_rows o USING (id)
         WHERE n.status <> o.status OR n.attempts <> o.attempts;
    END IF;
    IF FOUND THEN
        PERFORM pg_notify(:events_channel, '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER order_events_inserted AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_events_written();
CREATE TRIGGER order_events_updated AFTER UPDATE ON orders
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_events_written();

-- Events older than the retention go, the oldest batch at a time (the relay calls it until
-- fewer than a batch go): each call reads only the first ``batch`` ids, never the whole table.
CREATE FUNCTION expire_order_events(older_than interval, batch integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = public AS $$
    WITH gone AS (
        DELETE FROM order_events
         WHERE id IN (SELECT id FROM order_events ORDER BY id LIMIT batch)
           AND at < clock_timestamp() - older_than
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;
REVOKE EXECUTE ON FUNCTION expire_order_events(interval, integer) FROM PUBLIC;
