"""Deployment back-ends: ONNX, TorchScript, torch.export (pt2) and compressed checkpoints."""
