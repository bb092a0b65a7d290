"""Files to deploy: ONNX (fp32 and guarded int8) and torch.export."""
