"""``moe::TopKRoute``: V-MoE top-k routing with a fixed capacity, vanilla or Batch Prioritized."""
