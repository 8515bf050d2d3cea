"""Routing-aware parity: a graph, an engine or a bundle against PyTorch."""
