-- What an Idempotency-Key finds is answered 202 only once the synchronous standby holds it
-- (producer/store.py): these lock the rows the keys name, a lock PostgreSQL writes to its WAL,
-- so the caller's commit waits for the standby to flush all that came before, those rows
-- included. They run as the owner: the producer's role may not lock rows (no UPDATE).
CREATE FUNCTION hold_orders(keys text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    PERFORM 1 FROM orders WHERE idempotency_key = ANY (keys) ORDER BY id FOR KEY SHARE;
END
$$;
CREATE FUNCTION hold_crawls(keys text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    PERFORM 1 FROM crawls WHERE idempotency_key = ANY (keys) ORDER BY id FOR KEY SHARE;
END
$$;
REVOKE EXECUTE ON FUNCTION hold_orders(text[]), hold_crawls(text[]) FROM PUBLIC;
