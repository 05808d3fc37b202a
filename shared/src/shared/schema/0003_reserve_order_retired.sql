-- Was ``reserve_order``, one order's reservation: the batch's rule since migration 8.
SELECT 1;
