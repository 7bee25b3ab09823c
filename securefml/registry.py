"""Name -> class registries that back the CLI choices (learners, protocols, defenses, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from securefml.errors import ConfigError

T = TypeVar("T")

__all__ = ["Registry", "parse_spec"]


class Registry(Generic[T]):
    """A small explicit registry: ``register`` in the defining module, ``create`` by name.

    An unknown name raises a ``ConfigError`` that lists the valid ones.
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

    def create(self, name: str, **kwargs: object) -> T:
        factory = self.get(name)
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
