-- The crawler (docs/crawler.md). A page row is its crawl task's outbox entry while
-- ``unpublished``; the unique (crawl_id, url) is what fetches each URL once per crawl.
CREATE TABLE crawls (
    id            uuid PRIMARY KEY,
    root_url      text NOT NULL,
    frontier      text NOT NULL CHECK (frontier IN ('fifo', 'lifo', 'priority')),
    max_depth     integer NOT NULL CHECK (max_depth >= 0),
    max_pages     integer NOT NULL CHECK (max_pages >= 1),
    allowed_hosts text[] NOT NULL,
    status        text NOT NULL CHECK (status IN ('running', 'completed', 'cancelled')),
    pages         integer NOT NULL DEFAULT 0,
    idempotency_key text UNIQUE,
    request_hash  bytea,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz
);
CREATE SEQUENCE crawl_visits;
CREATE TABLE crawl_pages (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    crawl_id      uuid NOT NULL REFERENCES crawls (id),
    url           text NOT NULL,
    depth         integer NOT NULL,
    redirects     integer NOT NULL DEFAULT 0,
    found_from    uuid,
    seq           bigserial,
    status        text NOT NULL DEFAULT 'queued' CHECK (status IN
                    ('queued','fetching','fetched','failed','blocked','cancelled')),
    unpublished   boolean NOT NULL DEFAULT true,
    attempts      integer NOT NULL DEFAULT 0,
    claimed_until timestamptz,
    visit         bigint,
    http_status   integer,
    content_type  text,
    title         text,
    links         integer,
    links_out     text[],
    error         text,
    fetched_at    timestamptz,
    UNIQUE (crawl_id, url)
);
CREATE INDEX crawl_pages_unpublished ON crawl_pages (seq) WHERE unpublished;
CREATE INDEX crawl_pages_open ON crawl_pages (crawl_id) WHERE status IN ('queued', 'fetching');
