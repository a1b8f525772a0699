"""User-facing errors.

Every error moefx raises on bad input is a :class:`MoefxError` whose message is a single line that names
the problem and the fix, so callers (and the CLI) can show it without a traceback from deep inside torch.
"""

from __future__ import annotations

import re


class MoefxError(Exception):
    """A problem with the user's input or model, explained in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class CaptureError(MoefxError):
    """The model could not be captured as a graph."""


class DetectionError(MoefxError):
    """No MoE block was found, or a block could not be understood exactly."""


class ConfigError(MoefxError):
    """A configuration value is out of range or inconsistent."""


class CalibrationError(MoefxError):
    """The calibration data is missing, empty or unusable."""


class CheckpointError(MoefxError):
    """A checkpoint or artifact path is wrong, missing or corrupt."""


class MoefxWarning(UserWarning):
    """moefx did something other than asked (e.g. kept an exact router it could not prune soundly)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened, for embedding in a one-line error
    (terminal colour codes removed)."""
    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__
