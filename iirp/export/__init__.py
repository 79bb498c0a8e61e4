"""ONNX export, TensorRT build, manifest and verification (not implemented yet)."""
