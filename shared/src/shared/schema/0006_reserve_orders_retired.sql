-- Was ``reserve_orders`` calling ``reserve_order``: migration 8 has the one rule.
SELECT 1;
