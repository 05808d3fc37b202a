ALTER TABLE orders ADD COLUMN processed_by text;
