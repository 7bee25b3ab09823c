"""Every docstring example in the library runs, so the docs cannot drift from the code."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest


def _modules() -> list[str]:
    # protocols/, defenses/ and attacks/ live beside securefml/ and are mapped into it, so
    # each package is walked from its own path
    names = set()
    for pkg in ("securefml", "securefml.protocols", "securefml.defenses", "securefml.attacks"):
        package = importlib.import_module(pkg)
        names.add(pkg)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, prefix=pkg + "."))
    return sorted(names)


def _with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    out = []
    for name in _modules():
        module = importlib.import_module(name)
        if any(t.examples for t in finder.find(module, name)):
            out.append(name)
    return out


MODULES = _with_examples()


def test_the_examples_are_found():
    # the registries, the attack base class, defenses and evaluation all document by example
    for expected in ("securefml.registry", "securefml.attacks.base", "securefml.defenses", "securefml.evaluation.api"):
        assert expected in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
