"""What a run is, for every kind of run: progress callbacks, the result, the versions.

Shared by the image pipeline (:mod:`secateurs.pipeline`) and the language-model run
(:mod:`secateurs.pipeline_lm`), and by the front ends that drive them.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from secateurs._version import __version__
from secateurs.report import RunReport


@dataclass
class Progress:
    """Callbacks a front end uses to show what is happening (all optional)."""

    phase: Callable[[str, int], None] = lambda name, total: None  #: a phase starts, ``total`` steps
    advance: Callable[[int, int], None] = lambda done, total: None  #: steps done in the phase
    message: Callable[[str], None] = lambda text: None  #: a line worth showing


@dataclass
class RunResult:
    """What a run produced: its report, the pruned model and where the files went."""

    report: RunReport
    model: nn.Module
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """The versions a run's numbers depend on."""
    return {
        "secateurs": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
