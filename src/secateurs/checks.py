"""Validation of the plain values every config takes: sparsities, counts, fractions.

One function per kind of value, so that every option of that kind is checked the same way and
its error says the same thing: what the option is, what was given and what is allowed.
``bool`` is never taken for a number (``True`` is an ``int`` to Python, not to a user).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from secateurs.errors import ConfigError


@contextmanager
def option(name: str) -> Iterator[None]:
    """Tag a :class:`ConfigError` raised while checking option ``name`` with that name
    (``exc.key``), so a recipe can say which key was wrong."""
    try:
        yield
    except ConfigError as exc:
        if exc.key is None:
            exc.key = name
        raise


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sparsity(value: object, what: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1) and return it as a float."""
    if not _is_number(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise ConfigError(
            f"{what} must be a number in [0, 1) (the fraction of weights to remove); got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def check_int(value: object, what: str, minimum: int) -> int:
    """Validate an integer (not a bool, not a float) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}; got {value!r}")
    return value


def check_nonnegative(value: object, what: str, hint: str = "") -> float:
    """Validate a finite number >= 0 and return it as a float; ``hint`` (e.g. `` (a fraction
    of ...)``) goes into the error after what is allowed."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:  # type: ignore[arg-type,operator]
        raise ConfigError(f"{what} must be a finite number >= 0{hint}; got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_fraction(value: object, what: str) -> float:
    """Validate a number strictly between 0 and 1."""
    if not _is_number(value) or not 0 < value < 1:  # type: ignore[operator]
        raise ConfigError(f"{what} must be a number in (0, 1); got {value!r}")
    return float(value)  # type: ignore[arg-type]
