"""moefx: a torch.fx graph-rewrite compiler that makes Mixture-of-Experts models small and fast to deploy.

Capture a model (:func:`trace`), find its MoE blocks (:func:`find_moe_blocks`), and rewrite them into
merged, compressed expert banks.
"""

from moefx.block import MoEBlock
from moefx.capture import trace
from moefx.errors import (
    CalibrationError,
    CaptureError,
    CheckpointError,
    ConfigError,
    DetectionError,
    MoefxError,
)
from moefx.passes.detect import find_moe_blocks

__all__ = [
    "CalibrationError",
    "CaptureError",
    "CheckpointError",
    "ConfigError",
    "DetectionError",
    "MoEBlock",
    "MoefxError",
    "find_moe_blocks",
    "trace",
]
__version__ = "0.1.0"
