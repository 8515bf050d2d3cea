"""``moe::TopKCombine``: expert outputs back to tokens, the gate-weighted sum of the kept choices."""
