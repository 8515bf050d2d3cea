"""Deployment: the bundle for an edge GPU, its README, PTX precompilation, engines, Triton Inference Server."""
