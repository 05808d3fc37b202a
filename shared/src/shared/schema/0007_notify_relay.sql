-- What adds rows to publish wakes the relays (in any process) at its commit, one notification
-- per transaction: 'orders' from the outbox, 'crawls' from crawl pages.
CREATE FUNCTION notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(:outbox_channel, TG_ARGV[0]);
    RETURN NULL;
END
$$;
CREATE TRIGGER notify_relay AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_relay('orders');
CREATE TRIGGER notify_relay AFTER INSERT ON crawl_pages
    FOR EACH STATEMENT EXECUTE FUNCTION notify_relay('crawls');
