"""The docstring examples of the evaluation package run (a users' own attack through ``evaluate``)."""

from __future__ import annotations

import doctest

import pytest

from securefml.evaluation import api, cli


@pytest.mark.parametrize("module", [api, cli])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
