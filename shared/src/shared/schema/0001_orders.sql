CREATE TABLE orders (
    id              uuid PRIMARY KEY,
    customer_id     text NOT NULL,
    items           jsonb NOT NULL,
    priority        smallint NOT NULL CHECK (priority BETWEEN 0 AND 9),
    status          text NOT NULL CHECK (status IN
                      ('accepted','processing','retrying','completed','rejected','failed')),
    attempts        integer NOT NULL DEFAULT 0,
    reason          text,
    idempotency_key text UNIQUE,
    request_hash    bytea,
    next_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at    timestamptz
);
CREATE INDEX orders_status ON orders (status);
CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    order_id   uuid NOT NULL UNIQUE REFERENCES orders (id),
    priority   smallint NOT NULL
);
CREATE INDEX outbox_next ON outbox (priority DESC, seq);
CREATE TABLE inventory (
    sku        text PRIMARY KEY,
    available  integer NOT NULL CHECK (available >= 0),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE reservations (
    order_id   uuid NOT NULL REFERENCES orders (id),
    sku        text NOT NULL REFERENCES inventory (sku),
    quantity   integer NOT NULL CHECK (quantity > 0),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (order_id, sku)
);
