"""moefx: a torch.fx graph-rewrite compiler that makes Mixture-of-Experts models small and fast to deploy.

Capture a model (:func:`trace`), find its MoE blocks (:func:`find_moe_blocks`), and rewrite them into
merged, compressed expert banks.
"""

from moefx.api import CompressionReport, calibrate, compile, convert, prepare
from moefx.block import MoEBlock
from moefx.capture import trace
from moefx.config import CompressionConfig
from moefx.errors import (
    CalibrationError,
    CaptureError,
    CheckpointError,
    ConfigError,
    DetectionError,
    MoefxError,
    MoefxWarning,
)
from moefx.export.checkpoint import load, save
from moefx.passes.detect import find_moe_blocks
from moefx.recover import recover

__all__ = [
    "CalibrationError",
    "CaptureError",
    "CheckpointError",
    "CompressionConfig",
    "CompressionReport",
    "ConfigError",
    "DetectionError",
    "MoEBlock",
    "MoefxError",
    "MoefxWarning",
    "calibrate",
    "compile",
    "convert",
    "find_moe_blocks",
    "load",
    "prepare",
    "recover",
    "save",
    "trace",
]
__version__ = "0.1.0"
