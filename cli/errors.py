"""How a command ends: problems the user must fix (a config key, a missing bucket, bad source data
under --strict, an unreadable image) become one line `error: ...` on stderr and exit code 2; bugs keep
their traceback; Ctrl-C ends with 130."""
from __future__ import annotations

import argparse
import re
import sys

from core.config import ConfigError
from core.storage import StorageError
from data_prep.sources import SourceError
from pipeline.checkpoint import CheckpointPublishError
from pipeline.metrics.panoptic import PanopticError
from pipeline.metrics.semantic import SemanticError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# User errors whose modules are light: told apart without importing torch, so a mistyped key, address
# or path fails in a fraction of a second (JobsError and RegistryError are ConfigErrors).
LIGHT_USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, StorageError, SourceError, CheckpointPublishError,
                                                  PanopticError, SemanticError)


def heavy_user_errors() -> tuple[type[Exception], ...]:
    """User errors defined next to the training stack; importing them costs seconds (torch)."""
    from data_prep.shard import StrictRejectError  # heavy: pycocotools
    from model.weights_file import CheckpointError  # heavy: torch
    from pipeline.evaluators import EvalInputError  # heavy: torch
    from pipeline.loader import LoaderError  # heavy: torch
    from pipeline.metrics.coco import CocoEvalError  # heavy: pycocotools
    from pipeline.predict import PredictInputError  # heavy: torch
    from pipeline.trainer import TrainError  # heavy: torch, deepspeed
    from pipeline.transfer import TransferError  # heavy: torch

    return (StrictRejectError, CheckpointError, EvalInputError, LoaderError, CocoEvalError, PredictInputError,
            TrainError, TransferError)


def is_user_error(exc: Exception) -> bool:
    if isinstance(exc, LIGHT_USER_ERRORS):
        return True  # told without building the heavy tuple
    return isinstance(exc, heavy_user_errors())


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: Exception) -> str:
    """The message's first line, without terminal colour codes (some libraries colour what they wrap)."""
    lines = [line for line in _ANSI_ESCAPE.sub("", str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a user error becomes one stderr line and exit code 2."""
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_user_error(exc):
            raise  # a bug: keep the traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
