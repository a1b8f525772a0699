"""Deployment back-ends: ONNX (served by ONNX Runtime), torch.export (pt2), TorchScript, and checkpoints.

``moefx.export.pt2`` is the recommended PyTorch artifact; TorchScript is deprecated upstream.
"""

from moefx.export.checkpoint import checkpoint_inputs, load, load_report, save, save_pretrained, to_transformers
from moefx.export.generation import OnnxGenerator
from moefx.export.onnx import file_bytes, fused_blocks, onnx, with_quantized_experts
from moefx.export.pt2 import pt2
from moefx.export.torchscript import torchscript

__all__ = [
    "OnnxGenerator",
    "checkpoint_inputs",
    "file_bytes",
    "fused_blocks",
    "load",
    "load_report",
    "onnx",
    "pt2",
    "save",
    "save_pretrained",
    "to_transformers",
    "torchscript",
    "with_quantized_experts",
]
