"""The packed format refuses the settings it cannot hold, in one line: weight/KV groups, split KV clip."""
from __future__ import annotations

import pytest

from flatquant.core.quantizer import Quantizer
from flatquant.errors import CheckpointError
from flatquant.runtime.export import _check_quantizer


def test_refuses_groups_and_split_clip():
    _check_quantizer(Quantizer(4, symmetric=False), "kv", symmetric=False)  # the packed KV4 quantizer
    with pytest.raises(CheckpointError, match="without groups"):
        _check_quantizer(Quantizer(4, symmetric=True, group_size=16), "weight", symmetric=True)
    with pytest.raises(CheckpointError, match="separate lower/upper clip"):
        _check_quantizer(Quantizer(4, symmetric=False, learnable_clip=True, split_clip=True), "kv", symmetric=False)
    with pytest.raises(CheckpointError, match="2 bits"):
        _check_quantizer(Quantizer(2, symmetric=False), "keys", symmetric=False)
