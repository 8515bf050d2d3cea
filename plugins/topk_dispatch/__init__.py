"""``moe::TopKDispatch``: tokens to expert buffers, a gather through the slot table."""
