"""Name -> class registries that back the CLI choices (learners, protocols, defenses, ...)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from securefml.errors import ConfigError

T = TypeVar("T")

__all__ = ["Registry", "Entry", "parse_spec", "import_submodules"]


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: its factory and the option a bare CLI value sets (``"ipm:0.5"``)."""

    factory: Callable[..., T]
    positional: str | None = None


class Registry(Generic[T]):
    """A small explicit registry: ``register`` beside the definition, ``create``/``build`` by name.

    Options are bound against the factory's signature *before* it is called, so a misspelt or
    unknown option is a ``ConfigError`` that names the registered name and lists the valid options,
    while a ``TypeError`` raised inside a constructor stays what it is: a bug, with its traceback.
    An unknown name raises a ``ConfigError`` that lists the valid names.

    >>> reg: Registry[complex] = Registry("number")
    >>> _ = reg.register("complex", positional="real")(complex)
    >>> reg.build("complex:2,imag=1")
    (2+1j)
    >>> reg.build("complex:colour=1")
    Traceback (most recent call last):
    ...
    securefml.errors.ConfigError: unknown option 'colour' for number 'complex'; valid options: real, imag
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Entry[T]] = {}

    def register(
        self, name: str, *, positional: str | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register a factory under ``name``; ``positional`` is the option a bare spec value sets."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            if key in self._items:
                if _same_definition(self._items[key].factory, factory):
                    return factory  # one source file imported under a second module name: keep the first
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            if positional is not None and positional not in _option_names(factory):
                raise ConfigError(f"{self.kind} {name!r}: positional option {positional!r} is not a parameter")
            self._items[key] = Entry(factory, positional)
            return factory

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a user's plugin, or a test's toy); ``ConfigError`` if it is not registered."""
        self._entry(name)
        del self._items[name.lower()]

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``."""
        return self._entry(name).factory

    def _entry(self, name: str) -> Entry[T]:
        try:
            return self._items[name.lower()]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def options(self, name: str) -> tuple[str, ...]:
        """The keyword options ``name`` accepts, in its factory's signature order."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = _parameters(self.get(name))
        return tuple(p.name for p in params if p.kind in kinds and not p.name.startswith("_"))

    def accepts(self, name: str, option: str) -> bool:
        """Whether ``name``'s factory takes ``option`` (e.g. a protocol's ``seed``)."""
        factory = self.get(name)
        return option in _option_names(factory) or _takes_var_keyword(factory)

    def check_options(self, name: str, kwargs: Mapping[str, object]) -> None:
        """Raise ``ConfigError`` naming the unknown options of ``name`` and listing the valid ones.

        >>> reg: Registry[float] = Registry("rule")
        >>> _ = reg.register("clip")(lambda *, tau=1.0: tau)
        >>> reg.check_options("clip", {"tua": 2.0})
        Traceback (most recent call last):
        ...
        securefml.errors.ConfigError: unknown option 'tua' for rule 'clip'; valid options: tau
        """
        factory = self.get(name)
        if _takes_var_keyword(factory):
            return
        valid = self.options(name)
        unknown = [key for key in kwargs if key not in valid]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise ConfigError(
                f"unknown option{plural} {', '.join(map(repr, unknown))} for {self.kind} {name!r}; "
                f"valid options: {', '.join(valid) or 'none'}"
            )

    def create(self, name: str, /, **kwargs: object) -> T:
        """Build ``name`` with keyword options, checked against the factory's signature first."""
        factory = self.get(name)
        self.check_options(name, kwargs)
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            return factory(**kwargs)
        try:
            signature.bind(**kwargs)
        except TypeError as exc:  # e.g. a required option missing
            valid = ", ".join(self.options(name)) or "none"
            raise ConfigError(f"bad options for {self.kind} {name!r}: {exc}; valid options: {valid}") from None
        return factory(**kwargs)

    def build(self, spec: str, /, **defaults: object) -> T:
        """Build from a CLI spec ``NAME[:value][,key=value...]``; ``defaults`` fill options it omits."""
        name, kwargs = parse_spec(spec)
        if "_" in kwargs:
            positional = self._entry(name).positional
            if positional is None:
                raise ConfigError(
                    f"{self.kind} {name!r} takes key=value options only, got the bare value "
                    f"{kwargs['_']!r} in {spec!r}; valid options: {', '.join(self.options(name)) or 'none'}"
                )
            kwargs[positional] = kwargs.pop("_")
        return self.create(name, **{**defaults, **kwargs})

    def names(self) -> list[str]:
        """Every registered name, sorted (the CLI's choices)."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _parameters(factory: Callable[..., object]) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return []


def _option_names(factory: Callable[..., object]) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in _parameters(factory) if p.kind in kinds and not p.name.startswith("_")}


def _takes_var_keyword(factory: Callable[..., object]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(factory))


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


def _same_definition(first: Callable[..., object], second: Callable[..., object]) -> bool:
    """Whether ``second`` is ``first``'s source imported again under another package path.

    ``defenses/mean.py`` is ``securefml.defenses.mean`` once installed, but a tool that loads
    source files by path (``pytest --doctest-modules defenses/``) imports it a second time as
    ``defenses.mean``; its decorator then runs again for the same definition, which is not a
    conflict.  Two different definitions under one name still are.
    """
    first_module = getattr(first, "__module__", "") or ""
    second_module = getattr(second, "__module__", "") or ""
    return (
        getattr(first, "__qualname__", None) == getattr(second, "__qualname__", None)
        and first_module != second_module
        and (first_module.endswith("." + second_module) or second_module.endswith("." + first_module))
    )


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` so each definition's ``@REGISTRY.register`` has run.

    Each package keeps its registry in a ``registry.py`` that imports nothing of the package at
    run time, so every module can import it without a cycle, and each definition registers itself
    with a decorator beside its class.  The package ``__init__`` calls this
    (``import_submodules(__name__, __path__)``) after its explicit re-exports: a new module dropped
    into ``defenses/`` (or ``attacks/``, ``protocols/``, ...) is then registered with no second file
    to edit; re-exporting it from ``__init__`` is only for the public API.  Modules whose name
    starts with ``_`` are private and skipped.
    """
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
