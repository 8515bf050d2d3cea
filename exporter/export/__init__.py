"""Export: a PyTorch model to a portable ONNX graph, and the portability check."""
