"""Turning what a round measured into JSON-ready values, without losing the typed ones.

The round record used to keep only ``int``/``float``/``str``/``list``/``dict`` values, so tuples
(CKKS ``withheld_layers``, SecAgg+ ``bucket_index``), enums and stats dataclasses never reached
``result.json``.  ``json_ready`` converts instead of filtering: tuples and sets become lists,
enums their value, dataclasses and objects with ``to_dict()`` their fields, small tensors and
arrays their entries.  Only what has no faithful JSON form (a tensor of more than
``MAX_TENSOR_ENTRIES`` entries, a function, a generator) is left out, and that is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from enum import Enum
from typing import Any

import numpy as np
import torch

__all__ = ["json_ready", "MAX_TENSOR_ENTRIES"]

log = logging.getLogger(__name__)

#: Tensors up to this many entries are kept in the record (a cohort's Gram matrix fits).
MAX_TENSOR_ENTRIES = 4096

_DROP = object()


def _convert(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Enum):
        return _convert(value.value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return arr.tolist() if arr.size <= MAX_TENSOR_ENTRIES else _DROP
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            c = _convert(v)
            if c is not _DROP:
                out[str(_convert(k)) if not isinstance(k, str) else k] = c
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        converted = [_convert(v) for v in items]
        return [c for c in converted if c is not _DROP]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _convert(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _convert({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return _DROP


def json_ready(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every entry converted to plain JSON types (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        converted = _convert(value)
        if converted is _DROP:
            log.debug("round record: %r has no JSON form (%s); left out", key, type(value).__name__)
            continue
        out[key] = converted
    return out
