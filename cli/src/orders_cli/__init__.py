"""``orders``: one command to submit orders, watch them, drive load and operate the queues."""
