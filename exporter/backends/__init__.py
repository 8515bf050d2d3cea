"""Backends that run a graph or a model: ONNX Runtime, PyTorch, TensorRT."""
