"""Inference without torch: the embeddable engine (``runtime.engine``), the fine-bin sliding
window (``runtime.window``) and the ZeroMQ service.

Nothing is imported here, so a client that needs only the wire format does not load
onnxruntime.
"""
