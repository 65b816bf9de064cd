"""Which layers an operation applies to: ``include`` / ``exclude``, one way everywhere.

Every operation that acts on some layers of a model (pruning, shrinking, regularizers, weight
sharing, low-rank factorisation) takes the same two options: ``include`` (only these) and
``exclude`` (not these). A *selector* is a regular expression, matched in full against the
module name (``features.0``) or the tensor name (``features.0.weight``), an ``nn.Module``
subclass (every layer of that type), or a module object of the model itself.

A selector that matches nothing is an error naming it and showing what could be matched: a typo
must never silently select nothing (or everything). :class:`Selection` checks candidates one at a
time and remembers which selectors were used, so that check costs one pass.

Per-layer *amounts* (a sparsity or a ratio per layer) are keyed the same way; the first-match
rule they share is :func:`first_match`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from secateurs.errors import ConfigError

Selector = str | type[nn.Module] | nn.Module
V = TypeVar("V")


@dataclass(frozen=True)
class Candidate:
    """One thing a selector may pick: a tensor of a module (or a module, ``tensor`` = its
    ``weight``)."""

    module_name: str
    tensor_name: str
    module: nn.Module


def compile_selectors(selectors: Iterable[Selector] | Selector | None, what: str) -> list[Selector]:
    """Check ``include``/``exclude``-style selectors; a single one counts as a list of one.

    Strings must be valid regular expressions; anything else must be an ``nn.Module`` subclass
    or instance.
    """
    if selectors is None:
        return []
    if isinstance(selectors, (str, type, nn.Module)):
        selectors = [selectors]
    out: list[Selector] = []
    for s in selectors:
        if isinstance(s, str):
            try:
                re.compile(s)
            except re.error as exc:
                raise ConfigError(
                    f"{what} pattern {s!r} is not a valid regular expression: {exc}"
                ) from None
        elif not (isinstance(s, nn.Module) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise ConfigError(
                f"{what} entries must be regex strings, nn.Module subclasses or modules of the "
                f"model; got {s!r}"
            )
        out.append(s)
    return out


def matches(selector: Selector, candidate: Candidate) -> bool:
    """True when ``selector`` picks ``candidate`` (regex on either name, type, or identity)."""
    if isinstance(selector, type):
        return isinstance(candidate.module, selector)
    if isinstance(selector, nn.Module):
        return candidate.module is selector
    return bool(
        re.fullmatch(selector, candidate.module_name)
        or re.fullmatch(selector, candidate.tensor_name)
    )


def describe(selector: Selector) -> str:
    """How a selector is shown in a message."""
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, nn.Module):
        return f"the {type(selector).__name__} module given"
    return repr(selector)


class Selection:
    """``include`` / ``exclude`` selectors applied to candidates one by one.

    :meth:`picks` says whether a candidate is selected and records which selectors it used;
    :meth:`check_used` then raises for any selector that matched no candidate.
    """

    def __init__(
        self,
        include: Iterable[Selector] | Selector | None = None,
        exclude: Iterable[Selector] | Selector | None = None,
    ) -> None:
        self.include = compile_selectors(include, "include")
        self.exclude = compile_selectors(exclude, "exclude")
        self._used: set[tuple[str, int]] = set()

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def included(self, candidate: Candidate) -> bool | None:
        """True when an ``include`` selector picks ``candidate``, False when none does, None
        when there are no ``include`` selectors (everything is included)."""
        if not self.include:
            return None
        hits = [i for i, s in enumerate(self.include) if matches(s, candidate)]
        self._used.update(("include", i) for i in hits)
        return bool(hits)

    def excluded(self, candidate: Candidate) -> bool:
        """True when an ``exclude`` selector picks ``candidate``."""
        hits = [i for i, s in enumerate(self.exclude) if matches(s, candidate)]
        self._used.update(("exclude", i) for i in hits)
        return bool(hits)

    def picks(self, candidate: Candidate) -> bool:
        """Selected: included (or no ``include`` given) and not excluded."""
        return self.included(candidate) is not False and not self.excluded(candidate)

    def check_used(self, what: str, owner: nn.Module, names: Sequence[str]) -> None:
        """Raise :class:`ConfigError` for the first selector that matched no candidate.

        ``what`` names the candidates (``"prunable layer"``), ``names`` lists them for the
        message.
        """
        for label, selectors in (("include", self.include), ("exclude", self.exclude)):
            for i, s in enumerate(selectors):
                if (label, i) not in self._used:
                    raise ConfigError(
                        f"{label} pattern {describe(s)} matches no {what} of "
                        f"{type(owner).__name__}; {what}s: {preview(names)}"
                    )


def select(
    candidates: Sequence[Candidate],
    include: Iterable[Selector] | Selector | None,
    exclude: Iterable[Selector] | Selector | None,
    what: str,
    owner: nn.Module,
) -> list[Candidate]:
    """The candidates ``include`` / ``exclude`` pick; every selector must match one."""
    selection = Selection(include, exclude)
    chosen = [c for c in candidates if selection.picks(c)]
    selection.check_used(what, owner, [c.module_name or c.tensor_name for c in candidates])
    return chosen


def first_match(table: Mapping[str, V], *names: str) -> tuple[str, V] | None:
    """The entry of ``table`` (pattern -> value) for the first of ``names`` it keys.

    An exact key wins; otherwise the first pattern (in the table's order) that fully matches
    one of ``names`` as a regular expression. ``None`` when nothing matches.
    """
    for name in names:
        if name in table:
            return name, table[name]
    for pattern, value in table.items():
        if any(re.fullmatch(pattern, name) for name in names):
            return pattern, value
    return None


def check_patterns(patterns: Iterable[str], what: str) -> None:
    """Every pattern is a valid regular expression (``what`` names them in the error)."""
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"{what} keys must be layer names or regexes; got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{what} key {pattern!r} is not a valid regex: {exc}") from None


def preview(names: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` names, and how many there are in all."""
    if not names:
        return "(none)"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
