"""``moe::SoftDispatch``: every slot a dispatch-weighted mix of the tokens of its image."""
