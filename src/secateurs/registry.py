"""Name -> class registries, one per axis of a pruning plan.

A recipe says ``criterion: obd``; the registry turns that name into the class. Users register
their own methods with the same decorator. Registries hold classes, never instances, so no
mutable state is shared between pruning runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, cast

from secateurs.errors import ConfigError

T = TypeVar("T")
C = TypeVar("C")


class Registry(Generic[T]):
    """A named collection of method classes for one axis (structure, criterion, ...)."""

    def __init__(self, axis: str, base: type | None = None) -> None:
        self.axis = axis
        #: The class every method of this axis derives from: an object passed in its place
        #: must be an instance of it (``criterion=42`` is an error, not a crash later).
        self.base = base
        self._classes: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Decorator: make a class (or a factory function) available under ``name``."""

        def add(cls: C) -> C:
            if name in self._classes and self._classes[name] is not cls:
                raise ConfigError(f"{self.axis} name {name!r} is already registered")
            self._classes[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return add

    def get(self, name: str) -> type[T]:
        try:
            found: type[T] = self._classes[name]
            return found
        except KeyError:
            raise ConfigError(
                f"unknown {self.axis} {name!r}; allowed: {', '.join(sorted(self._classes))}"
            ) from None

    def build(self, spec: str | Mapping[str, Any] | T | None, default: T | None = None) -> T:
        """Build an instance from a name, ``{"name": ..., **options}``, or pass one through.

        ``None`` gives ``default`` (an error when there is none). Anything else that is not an
        instance of the axis's base class is an error naming what is allowed: an empty name,
        an empty mapping or a number never silently becomes the default.
        """
        if spec is None:
            if default is None:
                raise ConfigError(f"no {self.axis} given; allowed: {', '.join(self._classes)}")
            return default
        if self.base is not None and isinstance(spec, self.base):
            return cast(T, spec)
        if isinstance(spec, str):
            return build_dataclass(self.get(spec), {}, where=f"{self.axis} {spec!r}")
        if isinstance(spec, Mapping):
            options = dict(spec)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(
                    f"a {self.axis} given as a mapping needs a 'name' key; got {dict(spec)!r}"
                )
            cls = self.get(name)
            return build_dataclass(cls, options, where=f"{self.axis} {name!r}")
        if self.base is not None and not isinstance(spec, self.base):
            raise ConfigError(
                f"{self.axis} must be a name ({', '.join(sorted(self._classes))}), a mapping "
                f"{{'name': ..., **options}} or a {self.base.__name__} object; got {spec!r}"
            )
        return spec

    def names(self) -> list[str]:
        return list(self._classes)

    def items(self) -> Iterator[tuple[str, type[T]]]:
        return iter(self._classes.items())

    def __contains__(self, name: object) -> bool:
        return name in self._classes


def build_dataclass(cls: type[T], options: Mapping[str, Any], where: str) -> T:
    """Instantiate dataclass ``cls`` from ``options``, naming any unknown or bad key."""
    if dataclasses.is_dataclass(cls):
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_of(cls: type[T], config: T | None, options: Mapping[str, Any], where: str) -> T:
    """``config``, or a ``cls`` built from keyword ``options``: one or the other, never both.

    What every call taking a config does (``Pruner``, ``shrink``, the search spaces), so a
    user may pass ``config=PruneConfig(...)`` once and reuse it, or just the keywords.
    """
    if config is None:
        return build_dataclass(cls, options, where)
    if options:
        raise ConfigError(
            f"give {where} its options either as config={cls.__name__}(...) or as keywords "
            f"({', '.join(options)}), not both"
        )
    if not isinstance(config, cls):
        raise ConfigError(f"{where}: config must be a {cls.__name__}; got {config!r}")
    return config


def to_spec(obj: Any) -> dict[str, Any]:
    """The inverse of :meth:`Registry.build`: ``{"name": ..., **fields}`` for a method object."""
    spec: dict[str, Any] = {"name": getattr(type(obj), "registry_name", type(obj).__name__)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.init:
                value = getattr(obj, f.name)
                spec[f.name] = list(value) if isinstance(value, tuple) else value
    return spec
