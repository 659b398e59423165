"""Where the trainer computes: device choice, bad device names, the GPU gate, and (on CUDA) mixed precision.

The CUDA case runs two real trainers (real QUIC on 127.0.0.1, a host peer that published the run), one on the
GPU (fp16 autocast, a gradient scaler, optimizer state offloaded to the CPU) and one on the CPU: a swarm of
mixed machines holds identical parameters at every epoch both went through, and the held-out loss falls. The
GPU peer is first denied its GPU by the preferences and does no work until allowed. Marked ``gpu``; skips
without CUDA.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from coordinator_free_dht.identity import Identity
from tests.training_helpers import Epochs, joined_trainer, reached
from volunteer.cli import app
from volunteer.client.status import RoleReport
from volunteer.client.swarm import Swarm
from volunteer.client.trainer import Trainer, TrainerConfig, resolve_device
from volunteer.errors import RunError
from volunteer.host.monitor import WorkGate
from volunteer.run.manifest import AveragingSpec, ModelSpec, SignedManifest, default_manifest

HAS_CUDA = torch.cuda.is_available()


def test_auto_picks_cuda_when_present_else_cpu() -> None:
    expected = torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [("gpu", "unknown device 'gpu'"), ("meta", "not supported"), ("cuda:99", "CUDA device")],
)
def test_bad_device_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(RunError, match=message):
        resolve_device(name)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RunError, match="no usable CUDA device"):
        resolve_device("cuda")


def test_precision_must_be_known() -> None:
    with pytest.raises(RunError, match="precision must be one of"):
        TrainerConfig(precision="int4")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--device", "tpu"], "unknown device"), (["--precision", "fp8"], "precision must be one of")],
)
def test_join_refuses_bad_device_options(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOLUNTEER_HOME", str(tmp_path))
    nobody = Identity.generate().peer_id
    result = CliRunner().invoke(app, ["join", "demo", "--peer", f"quic://127.0.0.1:9/{nobody}", *args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


async def test_gate_holds_gpu_work_until_allowed() -> None:
    gate = WorkGate()
    gate.open()
    assert gate.use_gpu
    gate.set_use_gpu(False)
    waiter = asyncio.create_task(gate.wait_gpu())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    gate.set_use_gpu(True)
    async with asyncio.timeout(5):
        await waiter
    assert gate.use_gpu


# --- on a CUDA device -------------------------------------------------------------------------------------

SMALL = {"input_dim": 64, "hidden_dim": 64, "num_layers": 2, "num_classes": 10}


def _signed_run(owner: Identity) -> SignedManifest:
    manifest = default_manifest("gpu-test", "mlp", owner.public_key, seed=5)
    manifest = replace(
        manifest,
        model=ModelSpec("mlp", dict(SMALL)),
        averaging=AveragingSpec(
            mode="grad", target_batch_size=512, batch_size=32, matchmaking_time=1.0, min_group_size=2
        ),
    )
    return SignedManifest.sign(manifest, owner)


@pytest.mark.parametrize(
    "second",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])],
)
async def test_a_held_peer_joins_later_and_both_stay_identical_and_learn(second: str, tmp_path: Path) -> None:
    """Two peers; the second is held at first (CPU: paused; GPU: the preferences deny the GPU), so the first
    trains alone; once released, both hold identical parameters. With ``cuda`` the second trains on the GPU in
    fp16 with a gradient scaler and its optimizer state on the CPU."""
    owner = Identity.from_seed(b"g" * 32)
    signed = _signed_run(owner)
    gates = [WorkGate(), WorkGate()]
    trainers: list[Trainer] = []
    events = Epochs()

    async with contextlib.AsyncExitStack() as stack, asyncio.timeout(100), asyncio.TaskGroup() as tg:
        host = await stack.enter_async_context(Swarm(owner))
        assert await host.publish_manifest(signed)
        tasks = []
        for index, device in ((1, "cpu"), (2, second)):
            trainer = await joined_trainer(
                stack,
                host,
                signed.manifest.reference,
                index,
                tmp_path / f"cache{index}",
                TrainerConfig(device=device, precision="fp16"),
                events.on_epoch,
            )
            await trainer.prepare()
            assert trainer.device.type == device
            if device == "cuda":
                assert trainer.scaler is not None
                assert trainer.offload
                assert trainer.master[0].device.type == "cpu"
            gate = gates[index - 1]
            if index == 1:
                gate.open()
            elif device == "cuda":
                gate.open()
                gate.set_use_gpu(False)
            trainers.append(trainer)
            tasks.append(tg.create_task(trainer.run(gate, RoleReport())))
        try:
            await events.until(lambda: reached(trainers[0]) >= 2, 100, "the first peer to reach epoch 2")
            assert len(trainers[1].epochs) <= 1, "the held peer trained"
            gates[1].set_use_gpu(True)
            gates[1].open()
            await events.until(lambda: min(reached(t) for t in trainers) >= 6, 100, "both peers to reach epoch 6")
        finally:
            for task in tasks:
                task.cancel()
    # Compare the epochs both went through once both trained (the first ones were the first peer's alone).
    first, later = ({r.epoch: r.param_hash for r in t.epochs} for t in trainers)
    shared = sorted(epoch for epoch in first.keys() & later.keys() if epoch >= 4)
    assert len(shared) >= 2
    for epoch in shared:
        assert first[epoch] == later[epoch], f"the peers disagree at epoch {epoch}"
    start = trainers[0].loss_start
    assert start is not None
    assert min(p.loss for p in trainers[0].history[1:]) < start
