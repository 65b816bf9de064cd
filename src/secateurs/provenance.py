"""What secateurs did to a model, kept on the model itself.

Operations that change a model (in place, or a copy they return) return the model, so that
every call has one return type; what they measured and decided (a report) is recorded on the
model and read back with :func:`report_of`::

    small = sc.shrink(model, example, sc.MACs(0.5))
    report = sc.report_of(small, sc.ShrinkReport)      # sizes before and after, the plan

A report lives in the module's ``__dict__``: it follows ``copy.deepcopy`` and is never part of
the ``state_dict``. Recording a report of a kind replaces the previous one of that kind.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from secateurs.errors import ConfigError

R = TypeVar("R")

_ATTR = "_secateurs_reports"


def record(model: nn.Module, report: object) -> None:
    """Keep ``report`` on ``model`` under its type (replacing one of the same type)."""
    reports: dict[type, object] = model.__dict__.setdefault(_ATTR, {})
    reports[type(report)] = report


def forget(model: nn.Module, kind: type) -> None:
    """Drop the report of type ``kind`` (an operation was undone)."""
    model.__dict__.get(_ATTR, {}).pop(kind, None)


def find_report(model: nn.Module, kind: type[R]) -> R | None:
    """The report of type ``kind`` recorded on ``model``, or None."""
    found = model.__dict__.get(_ATTR, {}).get(kind)
    return found if isinstance(found, kind) else None


def report_of(model: nn.Module, kind: type[R]) -> R:
    """The report of type ``kind`` that a secateurs operation recorded on ``model``.

    ``kind`` is :class:`~secateurs.ShrinkReport` (``shrink``),
    :class:`~secateurs.compress.SparsifyReport` (``sparsify_``) or
    :class:`~secateurs.compress.LowRankReport` (``factorize_``). A model no such operation
    produced is a :class:`~secateurs.ConfigError`.
    """
    found = find_report(model, kind)
    if found is None:
        made = {
            "ShrinkReport": "sc.shrink",
            "SparsifyReport": "sc.sparsify_",
            "LowRankReport": "sc.factorize_",
        }.get(kind.__name__, "a secateurs operation")
        raise ConfigError(
            f"{type(model).__name__} carries no {kind.__name__}: only a model returned by "
            f"{made} does (reports are not saved in files)"
        )
    return found
