"""TensorRT plugins for MoE routing, dispatch and combine (one folder per plugin).

Empty until the plugin rewrite lands: the exported graphs are portable standard ONNX today.
Nothing here imports tensorrt at import time; each plugin's TensorRT registration will live in its
own ``trt.py``, imported only when an engine is built.
"""
