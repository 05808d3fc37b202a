-- For the dashboard: recent completions and the latest failures without a scan.
CREATE INDEX orders_completed_at ON orders (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX orders_failures ON orders (updated_at) WHERE status IN ('rejected', 'failed');
