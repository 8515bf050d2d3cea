"""The plugin rewrite: each MoE layer's routing, dispatch and combine become moe:: plugin nodes."""
