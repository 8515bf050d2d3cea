"""Tools around the pipeline: benchmarks, capacity sweeps, routing pictures."""
