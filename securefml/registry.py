"""Name -> class registries that back the CLI choices (learners, protocols, defenses, ...)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from securefml.errors import ConfigError

T = TypeVar("T")

__all__ = ["Registry", "parse_spec"]


class Registry(Generic[T]):
    """A small explicit registry: ``register`` in the defining module, ``create`` by name.

    An unknown name raises a ``ConfigError`` that lists the valid ones; so does an unknown
    option name, checked against the factory's signature before anything is built (a typo such
    as ``krum:g=1`` never reaches the class, whose own error would name internals).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            if key in self._items:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name.lower()]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def options(self, name: str) -> tuple[str, ...] | None:
        """The keyword options ``name`` accepts, or ``None`` when its factory takes ``**kwargs``."""
        factory = self.get(name)
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # no introspectable signature
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(p.name for p in params if p.kind in keyword)

    def check_options(self, name: str, kwargs: Mapping[str, object]) -> None:
        """Raise ``ConfigError`` naming the unknown options of ``name`` and listing the valid ones.

        >>> reg = Registry("rule")
        >>> _ = reg.register("clip")(lambda *, tau=1.0: tau)
        >>> reg.check_options("clip", {"tua": 2.0})
        Traceback (most recent call last):
        ...
        securefml.errors.ConfigError: unknown option 'tua' for rule 'clip'; valid options: tau
        """
        valid = self.options(name)
        if valid is None:
            return
        unknown = [key for key in kwargs if key not in valid]
        if unknown:
            listed = ", ".join(valid) if valid else "none"
            plural = "s" if len(unknown) > 1 else ""
            raise ConfigError(
                f"unknown option{plural} {', '.join(map(repr, unknown))} for {self.kind} {name!r}; "
                f"valid options: {listed}"
            )

    def create(self, name: str, **kwargs: object) -> T:
        factory = self.get(name)
        self.check_options(name, kwargs)
        try:
            return factory(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"bad options for {self.kind} {name!r}: {exc}") from exc

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _coerce(value: str) -> object:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """Parse ``NAME[:k=v,...]`` (CLI form) into a name and keyword arguments.

    A bare positional value (``topk:0.25``) is returned under the key ``"_"``.

    >>> parse_spec("trimmedmean:f=2,beta=0.1")
    ('trimmedmean', {'f': 2, 'beta': 0.1})
    >>> parse_spec("topk:0.25")
    ('topk', {'_': 0.25})
    """
    name, _, rest = spec.partition(":")
    kwargs: dict[str, object] = {}
    if rest:
        for part in rest.split(","):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq:
                if "_" in kwargs:
                    raise ConfigError(f"more than one positional value in {spec!r}")
                kwargs["_"] = _coerce(key)
            else:
                kwargs[key.strip().replace("-", "_")] = _coerce(value.strip())
    if not name:
        raise ConfigError(f"empty name in spec {spec!r}")
    return name.strip().lower(), kwargs
