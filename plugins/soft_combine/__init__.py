"""``moe::SoftCombine``: every token a combine-weighted mix of the slot outputs of its image."""
