"""A trained run: its folder (model.json, weights), the engines that run it (PyTorch, ONNX Runtime) and the metrics."""
