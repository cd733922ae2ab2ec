"""Export diffusers checkpoints to per-patch-size DDiT engines (ONNX, optionally TensorRT)."""

__version__ = "0.1.0"
