"""The docstring examples of the defenses package run, so the docs cannot drift from the code."""

from __future__ import annotations

import doctest

import pytest

import securefml.defenses as defenses
from securefml.defenses import metrics


@pytest.mark.parametrize("module", [defenses, metrics])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
