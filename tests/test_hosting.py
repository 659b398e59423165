"""The host's checkpoint: atomic, non-pickle, round-trips exactly, and a damaged file is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from volunteer.client.hosting import Checkpoint, CheckpointState
from volunteer.errors import ClientError


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "run" / "demo.ckpt")
    assert ckpt.load() is None
    gen = torch.Generator().manual_seed(1)
    tensors = (torch.randn(3, 4, generator=gen), torch.arange(5, dtype=torch.int64), torch.empty(0))
    ckpt.save(CheckpointState(7, {"mode": "grad", "samples": 123}, tensors))
    ckpt.save(CheckpointState(8, {"mode": "grad"}, tensors))  # overwrite in place, atomically
    loaded = ckpt.load()
    assert loaded is not None
    assert loaded.epoch == 8
    assert dict(loaded.metadata) == {"mode": "grad"}
    for got, want in zip(loaded.tensors, tensors, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("cut", [0, 10, 40, -3])
def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path, cut: int) -> None:
    ckpt = Checkpoint(tmp_path / "demo.ckpt")
    ckpt.save(CheckpointState(1, {}, (torch.ones(16),)))
    data = ckpt.path.read_bytes()
    ckpt.path.write_bytes(data[:cut] if cut else b"not a checkpoint")
    with pytest.raises(ClientError, match="damaged"):
        ckpt.load()
