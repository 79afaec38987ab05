"""Local serving: the KServe Python model server over ONNX Runtime, its process control and smoke test."""
