"""Exceptions raised by secateurs.

Every error a user can cause is a :class:`SecateursError`. Messages say what was wrong and
what is allowed or what to do next, so a user never has to read the source to recover.
"""

from __future__ import annotations


class SecateursError(Exception):
    """Base class of every error secateurs raises on purpose."""


class ConfigError(SecateursError, ValueError):
    """A configuration value (argument, recipe key, budget) is invalid.

    ``key`` names the option that was wrong when the check knows it (a recipe prefixes its
    section: ``prune.criterion``).
    """

    key: str | None = None


class ModelError(SecateursError, ValueError):
    """The model cannot be handled as asked (nothing prunable, shape does not fit a structure)."""


class DataError(SecateursError, FileNotFoundError):
    """A data set is missing or malformed."""


class BudgetError(ConfigError):
    """A budget cannot be met by any allowed choice."""
