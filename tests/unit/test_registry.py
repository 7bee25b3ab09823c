"""Registries bind options against the factory's signature before calling it."""

from __future__ import annotations

import pytest
import torch

from securefml.attacks import ATTACKS, make_attack
from securefml.defenses import DEFENSES, AggregationResult, Defense, make_defense
from securefml.errors import ConfigError
from securefml.registry import Registry
from securefml.selection import make_selector


def test_unknown_option_names_the_public_name_and_the_valid_options() -> None:
    with pytest.raises(ConfigError) as err:
        make_defense("krum:g=1")
    message = str(err.value)
    assert "'krum'" in message and "'g'" in message and "f" in message.split("valid options:")[1]
    assert "_GeometryRule" not in message and "__init__" not in message


def test_bare_value_sets_the_option_declared_at_registration() -> None:
    assert make_defense("krum:3").f == 3
    assert make_defense("bucketing:4").size == 4
    assert make_attack("ipm:0.5").epsilon == 0.5
    assert make_selector("topk:0.3").fraction == 0.3


def test_bare_value_without_a_declared_option_is_refused_with_the_options() -> None:
    with pytest.raises(ConfigError, match="key=value options only.*valid options"):
        make_defense("median:3")


def test_a_type_error_inside_a_constructor_stays_a_bug() -> None:
    registry: Registry[object] = Registry("thing")

    @registry.register("broken")
    class Broken:
        def __init__(self, size: int = 1) -> None:
            raise TypeError("a real bug inside the constructor")

    with pytest.raises(TypeError, match="real bug"):
        registry.build("broken:size=2")


def test_a_positional_option_must_be_a_parameter() -> None:
    registry: Registry[object] = Registry("thing")
    with pytest.raises(ConfigError, match="not a parameter"):
        registry.register("bad", positional="nope")(dict)


def test_a_users_own_defense_registers_from_outside_the_package() -> None:
    class Halve(Defense):
        """A toy rule defined in a user's module: the mean, halved."""

        name = "halve"

        def __init__(self, factor: float = 0.5) -> None:
            self.factor = factor

        def aggregate(self, updates, weights, client_ids, *, context):  # type: ignore[no-untyped-def]
            return AggregationResult(aggregate=updates.mean(dim=0) * self.factor, client_ids=client_ids)

    DEFENSES.register("halve-test", positional="factor")(Halve)
    try:
        built = make_defense("halve-test:0.25")
        assert isinstance(built, Halve) and built.factor == 0.25
        assert "halve-test" in DEFENSES.names() and "halve-test" not in ATTACKS.names()
        assert float(built(torch.ones(3, 2)).aggregate[0]) == 0.25
    finally:  # the support page lists what is registered: leave nothing behind
        DEFENSES.unregister("halve-test")
    assert "halve-test" not in DEFENSES


_REGISTRIES = {
    "securefml.defenses": "DEFENSES",
    "securefml.attacks": "ATTACKS",
    "securefml.protocols": "PROTOCOLS",
    "securefml.meta": "LEARNERS",
    "securefml.data": "DATASETS",
}


@pytest.mark.parametrize("package", sorted(_REGISTRIES))
def test_each_definition_registers_itself_in_its_own_module(package: str) -> None:
    """Registration sits beside the definition: no package ``__init__`` registers anything, and every
    registered factory lives in a module of the package (not in ``__init__``)."""
    import importlib
    import inspect

    module = importlib.import_module(package)
    init_source = inspect.getsource(module)
    assert ".register(" not in init_source, f"{package}/__init__.py registers definitions itself"
    registry = getattr(module, _REGISTRIES[package])
    for name in registry.names():
        factory = registry.get(name)
        if factory.__module__.startswith(package):  # securefml.bayes adds learners from its own package
            assert factory.__module__ != package, f"{name!r} is defined in {package}/__init__.py"
            source = inspect.getsource(importlib.import_module(factory.__module__))
            assert f'.register("{name}"' in source, f"{name!r} is not registered beside its definition"


def test_a_new_module_in_a_package_registers_itself_without_editing_init(tmp_path, monkeypatch) -> None:
    """``import_submodules`` is what makes a new defense/attack/protocol one file: drop a module in
    the package folder and its decorator runs when the package is imported."""
    import importlib
    import sys

    package = tmp_path / "toyplugins"
    package.mkdir()
    (package / "registry.py").write_text("from securefml.registry import Registry\nTOYS = Registry('toy')\n")
    (package / "__init__.py").write_text(
        "from toyplugins.registry import TOYS\nfrom securefml.registry import import_submodules\n"
        "import_submodules(__name__, __path__)\n"
    )
    (package / "first.py").write_text("from toyplugins.registry import TOYS\n@TOYS.register('one')\nclass One: ...\n")
    (package / "second.py").write_text("from toyplugins.registry import TOYS\n@TOYS.register('two')\nclass Two: ...\n")
    (package / "_private.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        toys = importlib.import_module("toyplugins").TOYS
        assert toys.names() == ["one", "two"]
        assert type(toys.create("two")).__name__ == "Two"
    finally:
        for name in [m for m in sys.modules if m == "toyplugins" or m.startswith("toyplugins.")]:
            del sys.modules[name]


def test_one_source_imported_under_two_module_names_is_not_a_conflict() -> None:
    """``pytest --doctest-modules defenses/`` imports ``defenses/mean.py`` as ``defenses.mean`` beside
    ``securefml.defenses.mean``: the decorator runs twice for one definition, which must not fail,
    while two different definitions under one name still do."""
    registry: Registry[object] = Registry("thing")

    def make(module: str, qualname: str = "Rule") -> type:
        return type(qualname, (), {"__module__": module})

    first = make("securefml.defenses.mean")
    registry.register("rule")(first)
    registry.register("rule")(make("defenses.mean"))
    assert registry.get("rule") is first
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register("rule")(make("securefml.defenses.other"))
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register("rule")(make("defenses.mean", "OtherRule"))
