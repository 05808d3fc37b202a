-- Webhooks (docs/notifications.md): an API key's endpoints, and the deliveries of order events
-- to them and to an order's own ``callback_url``. A delivery is written by a trigger in the
-- transaction that writes its event, so it exists exactly when the event does; the outbox
-- relay publishes it (``unpublished``), and a consumer sends it, signed with the secret of its
-- endpoint, or for a callback with its key's callback secret.
ALTER TABLE orders ADD COLUMN callback_url text;

CREATE TABLE webhook_endpoints (
    id              uuid PRIMARY KEY,
    api_key         text NOT NULL,
    url             text NOT NULL,
    event_types     text[] NOT NULL,
    secret          text,  -- whsec_...; NULL once deleted
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    failing_since   timestamptz,  -- the first failed attempt since the last delivered one
    disabled_at     timestamptz,
    disabled_reason text,
    deleted_at      timestamptz
);
CREATE INDEX webhook_endpoints_key ON webhook_endpoints (api_key) WHERE deleted_at IS NULL;

CREATE TABLE callback_secrets (
    api_key    text PRIMARY KEY,
    secret     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE webhook_deliveries (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),  -- the webhook-id header
    endpoint_id  uuid REFERENCES webhook_endpoints,  -- NULL: the order's callback_url
    url          text NOT NULL,
    event_id     bigint NOT NULL,  -- order_events.id (events expire; deliveries keep the payload)
    order_id     uuid NOT NULL,
    api_key      text,
    payload      jsonb NOT NULL,
    status       text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts     integer NOT NULL DEFAULT 0,
    last_status  integer,  -- the receiver's last HTTP status
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at timestamptz,
    unpublished  boolean NOT NULL DEFAULT true,
    seq          bigserial
);
CREATE INDEX webhook_deliveries_unpublished ON webhook_deliveries (seq) WHERE unpublished;
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at);

-- Each new event goes to every live endpoint of its key that wants its type, and a final one
-- to its order's callback_url; the relays are woken once per transaction that made deliveries.
CREATE FUNCTION webhooks_fan_out() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO webhook_deliveries (endpoint_id, url, event_id, order_id, api_key, payload)
    SELECT target.endpoint_id, target.url, ev.id, ev.order_id, ev.api_key,
           jsonb_build_object(
               'type', 'order.' || ev.type,
               'timestamp', ev.at,
               'data', jsonb_build_object(
                   'id', ev.id, 'order_id', ev.order_id, 'type', ev.type, 'status', ev.status,
                   'attempts', ev.attempts, 'reason', ev.reason,
                   'next_attempt_at', ev.next_attempt_at, 'at', ev.at))
      FROM events ev
      CROSS JOIN LATERAL (
          SELECT e.id AS endpoint_id, e.url FROM webhook_endpoints e
           WHERE e.api_key = ev.api_key AND ('order.' || ev.type) = ANY (e.event_types)
             AND e.disabled_at IS NULL AND e.deleted_at IS NULL
          UNION ALL
          SELECT NULL, o.callback_url FROM orders o
           WHERE ev.type IN (:final_statuses) AND o.id = ev.order_id
             AND o.callback_url IS NOT NULL
      ) target
     ORDER BY ev.tx, ev.id;
    IF FOUND THEN
        PERFORM pg_notify(:outbox_channel, 'webhooks');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER webhooks_fan_out AFTER INSERT ON order_events
    REFERENCING NEW TABLE AS events
    FOR EACH STATEMENT EXECUTE FUNCTION webhooks_fan_out();
