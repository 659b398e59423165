"""The trainer role: data-parallel training of a run's model together with the swarm.

:class:`Trainer` is a :class:`~volunteer.client.runtime.Role`. :meth:`Trainer.prepare` does everything that
can fail because of the run (build the model from the manifest's template, open the data stream and read a
first batch, which downloads and verifies a shard of a sharded dataset), so ``volunteer join`` can report a
clear error before the runtime starts. :meth:`Trainer.run` then:

1. enters the :class:`~volunteer.optim.optimizer.CollaborativeOptimizer` (gradient averaging or local
   updates, as the manifest says) and downloads the current state from peers;
2. loops: one unit of work per ``gate.slot()`` (so pauses and the duty cycle apply between units, never
   inside one): the next batch (in gradient mode, several batches grouped up to ~20 ms of compute, as
   gradient accumulation: tiny models would otherwise pay a thread hop and an optimizer call per 1-ms step),
   forward and backward off the event loop (``asyncio.to_thread``), then ``await opt.step(samples)``, which
   averages and steps when the swarm has reached the target batch;
3. on a GPU (``TrainerConfig.device``, ``auto`` picks CUDA when there is one): the model and every batch live
   on the GPU and forward runs under autocast (fp16 with a ``torch.amp.GradScaler``, batches whose gradients
   overflowed are skipped; or bf16). By default the optimizer state is offloaded (``offload``): fp32 master
   parameters, the optimizer's moments and the gradient accumulators live on the CPU, the unscaled gradients are
   copied there after each unit, the optimizer steps there and the GPU model is refreshed from the master
   parameters whenever they change. That saves GPU memory and makes a GPU peer's update the very same
   arithmetic as a CPU peer's, so a swarm of mixed machines holds identical parameters (stepping on the GPU,
   ``offload=False``, is faster for large models but rounds differently from CPU peers). GPU units run only
   while the preferences allow the GPU in the current situation (``gate.use_gpu``); otherwise the trainer
   waits, says why, and the swarm goes on without it;
4. reports loss (on a fixed held-out batch, the same on every peer, at every new epoch), samples/s, epoch and
   peers into the :class:`~volunteer.client.status.RoleReport`, and as a :class:`Progress` to an optional
   callback (headless JSON lines, the demo).

Cancellation (Ctrl-C, ``q``, ``volunteer stop``) leaves through the optimizer's ``async with``, which
withdraws from matchmaking and finishes or abandons a round so no group waits for us.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch
from torch import nn

from volunteer.client.status import RoleReport
from volunteer.client.swarm import Swarm, run_id
from volunteer.errors import RunError
from volunteer.run.data import Batch, DataStream, evaluation_batch, open_stream
from volunteer.run.manifest import BuiltinData, Manifest
from volunteer.run.models import build_model, task_loss
from volunteer.run.optimizers import build_optimizer, build_scheduler
from volunteer.run.templates import Task

if TYPE_CHECKING:
    from volunteer.client.runtime import Gate

log = logging.getLogger(__name__)

__all__ = ["EpochReport", "Progress", "Trainer", "TrainerConfig", "parameter_hash", "resolve_device"]

EVAL_SAMPLES = 512
"""Size of the held-out batch the reported loss is measured on."""
GROUP_SECONDS = 0.02
"""Gradient mode: compute time one worker-thread call aims at (tiny steps are grouped up to it)."""
MAX_GROUP = 16
"""Most batches in one group."""
GPU_WAIT_S = 5.0
"""Seconds between checks while the preferences forbid the GPU."""
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True, slots=True)
class TrainerConfig:
    """Local settings of the trainer (the run's own settings come from the manifest)."""

    progress_interval: float = 2.0
    """Seconds between progress reports."""
    max_seconds: float | None = None
    """Stop after this long (benchmarks, the demo); None trains until cancelled."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default); several peers on one machine want 1 each."""
    device: str = "auto"
    """Where to train: ``auto`` (the first CUDA device if there is one, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N``."""
    precision: str = "auto"
    """GPU arithmetic: ``auto``/``fp16`` (autocast to float16 with a gradient scaler), ``bf16`` (autocast to
    bfloat16, no scaler), ``fp32``. The CPU always trains in fp32. Parameters stay fp32 everywhere."""
    offload: bool = True
    """GPU only: keep master parameters, optimizer state and accumulators on the CPU and step there (see the
    module docstring); ``False`` keeps everything on the GPU."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RunError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress report (also written as a JSON line with ``"type": "progress"``)."""

    time: float
    """Seconds since training started."""
    epoch: int
    """The collaborative epoch (global steps taken by the swarm)."""
    samples: int
    """Samples this peer processed."""
    samples_per_s: float
    """This peer's recent throughput."""
    loss: float
    """Latest loss on the held-out batch (the training loss for sharded data)."""
    train_loss: float
    """Mean training loss since the previous report."""
    peers: int
    """Peers in the run as the optimizer sees them (this one included)."""
    rounds: int
    """Averaging rounds this peer completed."""
    averaging_s: float
    """Seconds this peer spent averaging."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"type": "progress", **asdict(self)}


@dataclass(frozen=True, slots=True)
class EpochReport:
    """The parameters this peer holds at the start of an epoch (a JSON line with ``"type": "epoch"``).

    Every peer of a run in sync reports the same ``param_hash`` for the same ``epoch``; the benchmark and the
    tests compare them. A peer that knows its state may differ (its round failed and it has not resynchronised
    yet) says so with ``in_sync=False``.
    """

    epoch: int
    """The epoch that just began (after a global step or a state download)."""
    time: float
    """Seconds since training started."""
    param_hash: str
    """:func:`parameter_hash` of the model's parameters."""
    in_sync: bool = True
    """Whether the optimizer considers this peer in sync with the swarm at this epoch."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"type": "epoch", **asdict(self)}


def resolve_device(requested: str) -> torch.device:
    """The device ``requested`` names (``auto``: CUDA if available, else CPU); a clear :class:`RunError` for
    a malformed name or a CUDA device this machine does not have."""
    if requested == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as exc:
        raise RunError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RunError(f"device {requested!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise RunError(f"device {requested!r}: this machine has no usable CUDA device (torch {torch.__version__})")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise RunError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def parameter_hash(model: nn.Module) -> str:
    """A short BLAKE2b digest of a model's parameters (values, shapes and order): equal models, equal hash."""
    digest = hashlib.blake2b(digest_size=12)
    with torch.no_grad():
        for p in model.parameters():
            digest.update(repr((tuple(p.shape), str(p.dtype))).encode())
            digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    """The trainer role (see the module docstring)."""

    name = "trainer"

    def __init__(
        self,
        swarm: Swarm,
        manifest: Manifest,
        *,
        cache_dir: Path,
        config: TrainerConfig | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_epoch: Callable[[EpochReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.swarm = swarm
        self.manifest = manifest
        self.config = config or TrainerConfig()
        self._cache_dir = cache_dir
        self._on_progress = on_progress
        self._on_epoch = on_epoch
        self._clock = clock
        self._model: nn.Module | None = None
        self._stream: DataStream | None = None
        self._first: Batch | None = None
        self._eval: Batch | None = None
        self._http: httpx.AsyncClient | None = None
        self._stack = contextlib.AsyncExitStack()
        self.history: list[Progress] = []
        """Every progress report so far."""
        self.epochs: list[EpochReport] = []
        """The parameters' hash at the start of every epoch this peer reached (the first is after the state
        download)."""
        self.loss_start: float | None = None
        """The held-out loss after the state download, before this peer's first step."""
        self.device = torch.device("cpu")
        """Where the model trains (set by :meth:`prepare`)."""
        self.amp_dtype: torch.dtype | None = None
        """The autocast dtype on a GPU (``None``: fp32)."""
        self.scaler: torch.amp.GradScaler | None = None
        """The fp16 gradient scaler (``None`` unless training in fp16)."""
        self.offload = False
        """Whether the optimizer state lives on the CPU (a GPU peer with :attr:`master` parameters)."""
        self.master: list[nn.Parameter] = []
        """Offloaded: the fp32 master parameters on the CPU the optimizer trains (the model is refreshed from
        them)."""
        self._grad_holder: torch.optim.Optimizer | None = None

    @property
    def task(self) -> Task:
        """The run's task."""
        data = self.manifest.data
        return data.task if isinstance(data, BuiltinData) else Task(data.task)

    async def prepare(self) -> None:
        """Build the model and open the data (one batch is read now, so data errors surface before training).

        Raises :class:`~volunteer.errors.ManifestError` or :class:`~volunteer.errors.DataError`.
        """
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        m = self.manifest
        self.device = resolve_device(self.config.device)
        model = await asyncio.to_thread(build_model, m.model.template, m.model.config, m.seed)
        if self.device.type == "cuda":
            model = await asyncio.to_thread(model.to, self.device)
            self._choose_precision(model)
        self._model = model
        if not isinstance(m.data, BuiltinData):
            self._http = await self._stack.enter_async_context(httpx.AsyncClient())
        peer_seed = self.swarm.identity.peer_id.digest
        self._stream = open_stream(m.data, m.seed, peer_seed, cache_dir=self._cache_dir, client=self._http)
        self._first = await self._stream.next_batch(m.averaging.batch_size)
        if isinstance(m.data, BuiltinData):
            self._eval = evaluation_batch(m.data, m.seed, EVAL_SAMPLES)

    def _choose_precision(self, model: nn.Module) -> None:
        """Autocast dtype, gradient scaler and offload for a model on :attr:`device` (a CUDA device)."""
        precision = self.config.precision
        if precision in ("auto", "fp16"):
            self.amp_dtype = torch.float16
            self.scaler = torch.amp.GradScaler("cuda")
        elif precision == "bf16":
            if not torch.cuda.is_bf16_supported():
                raise RunError(f"{self.device} does not support bfloat16: use --precision fp16 or fp32")
            self.amp_dtype = torch.bfloat16
        self.offload = offload = self.config.offload
        if offload:
            self.master = [nn.Parameter(p.detach().to("cpu", copy=True)) for p in model.parameters()]
            if self.scaler is not None:
                # The scaler unscales the GPU gradients through an optimizer that never steps.
                self._grad_holder = torch.optim.SGD(model.parameters(), lr=0.0)
        log.info(
            "training on %s (%s), optimizer state on %s",
            torch.cuda.get_device_name(self.device),
            "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
            "the CPU" if offload else "the GPU",
        )

    async def aclose(self) -> None:
        """Close the HTTP client (if any)."""
        await self._stack.aclose()

    def _train_steps(self, batches: list[Batch]) -> list[float]:
        """Forward and backward over ``batches``; ``.grad`` ends as the mean gradient over all their samples."""
        assert self._model is not None
        self._model.train()
        total = sum(b.size for b in batches)
        device, amp = self.device, self.amp_dtype
        losses = []
        for batch in batches:
            inputs = batch.inputs.to(device, non_blocking=True)
            targets = batch.targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                output = self._model(inputs)
            loss = task_loss(self.task, output.float(), targets)
            weighted = loss * (batch.size / total)
            if self.scaler is not None:
                weighted = self.scaler.scale(weighted)
            weighted.backward()  # type: ignore[no-untyped-call]
            losses.append(loss.detach())
        if self.master:
            self._grads_to_master()
        return [float(x) for x in losses]

    def _grads_to_master(self) -> None:
        """Offloaded: unscale the GPU gradients, move them to the master parameters, update the scale."""
        assert self._model is not None
        if self.scaler is not None:
            assert self._grad_holder is not None
            self.scaler.unscale_(self._grad_holder)
        for master, p in zip(self.master, self._model.parameters(), strict=True):
            master.grad = None if p.grad is None else p.grad.to("cpu", torch.float32)
            p.grad = None
        if self.scaler is not None:
            self.scaler.update()

    def _master_to_model(self) -> None:
        """Offloaded: copy the master parameters (after a step or a state download) into the GPU model."""
        assert self._model is not None
        with torch.no_grad():
            for master, p in zip(self.master, self._model.parameters(), strict=True):
                p.copy_(master, non_blocking=True)
        torch.cuda.synchronize(self.device)

    def _group_size(self, seconds_per_batch: float | None) -> int:
        """Batches per worker-thread call: in gradient mode, enough for ~:data:`GROUP_SECONDS` of compute (one
        thread hop, one gate slot and one optimizer call per group instead of per batch), at most 1/16 of the
        epoch's target so the swarm does not overshoot it. Local mode steps after every batch (the algorithm)."""
        spec = self.manifest.averaging
        if spec.mode != "grad" or seconds_per_batch is None or seconds_per_batch <= 0:
            return 1
        cap = max(1, spec.target_batch_size // (16 * spec.batch_size))
        return max(1, min(cap, MAX_GROUP, int(GROUP_SECONDS / seconds_per_batch)))

    def _evaluate(self) -> float:
        assert self._model is not None
        assert self._eval is not None
        self._model.eval()
        with torch.no_grad():
            output = self._model(self._eval.inputs.to(self.device))
            return float(task_loss(self.task, output.float(), self._eval.targets.to(self.device)))

    async def run(self, gate: Gate, report: RoleReport) -> None:
        """Train until cancelled (or :attr:`TrainerConfig.max_seconds`); see the module docstring."""
        from volunteer.optim.optimizer import CollaborativeConfig, CollaborativeOptimizer

        if self._model is None:
            await self.prepare()
        assert self._model is not None
        assert self._stream is not None
        m = self.manifest
        report.run, report.role = m.reference, self.name
        report.state, report.reason = "training", "downloading the current state from peers"
        trained: nn.Module | list[nn.Parameter] = self.master or self._model
        inner = build_optimizer(m.optimizer, self.master or self._model.parameters())
        scheduler = build_scheduler(m.optimizer, inner)
        opt = CollaborativeOptimizer(
            trained,
            inner,
            scheduler,
            node=self.swarm.node,
            rpc=self.swarm.rpc,
            run_id=run_id(m),
            config=CollaborativeConfig.from_spec(m.averaging),
            scaler=None if self.master else self.scaler,
        )
        async with opt:
            await opt.load_state_from_peers()
            if self.master:
                await asyncio.to_thread(self._master_to_model)
            await self._loop(opt, gate, report)

    async def _loop(self, opt: Any, gate: Gate, report: RoleReport) -> None:
        batch_size = self.manifest.averaging.batch_size
        has_eval = self._eval is not None
        loss = await asyncio.to_thread(self._evaluate) if has_eval else math.nan
        self.loss_start = loss
        report.add_loss(opt.epoch, loss)
        report.state, report.reason = "training", ""
        started = last = self._clock()
        await self._epoch_began(opt.epoch, 0.0, opt.in_sync)
        self._emit(opt, report, 0.0, 0, 0.0, loss, [])
        samples = window_samples = 0
        train_losses: list[float] = []
        epoch = opt.epoch
        first = self._first
        self._first = None
        per_batch: float | None = None
        synced = self._changes(opt)
        while self.config.max_seconds is None or self._clock() - started < self.config.max_seconds:
            if self.device.type == "cuda" and not gate.use_gpu:
                await self._wait_for_gpu(gate, report)
                continue
            async with gate.slot():
                batches = [first] if first is not None else []
                first = None
                while len(batches) < self._group_size(per_batch):
                    batches.append(await self._stream_next(batch_size))
                step_started = self._clock()
                train_losses.extend(await gate.run_in_thread(self._train_steps, batches))
                computed = (self._clock() - step_started) / len(batches)
                per_batch = computed if per_batch is None else 0.8 * per_batch + 0.2 * computed
                size = sum(b.size for b in batches)
                await opt.step(size)
                if self.master and (self.manifest.averaging.mode == "local" or synced != self._changes(opt)):
                    await asyncio.to_thread(self._master_to_model)
                    synced = self._changes(opt)
                samples += size
                window_samples += size
                report.add_work(samples=size, seconds=self._clock() - step_started)
            if opt.epoch != epoch:
                epoch = opt.epoch
                await self._epoch_began(epoch, self._clock() - started, opt.in_sync)
                if has_eval:
                    loss = await asyncio.to_thread(self._evaluate)
                    report.add_loss(epoch, loss)
            now = self._clock()
            if now - last >= self.config.progress_interval:
                self._emit(opt, report, now - started, samples, window_samples / (now - last), loss, train_losses)
                last, window_samples, train_losses = now, 0, []
        if has_eval:
            loss = await asyncio.to_thread(self._evaluate)
        now = self._clock()
        self._emit(opt, report, now - started, samples, samples / max(now - started, 1e-9), loss, train_losses)

    @staticmethod
    def _changes(opt: Any) -> tuple[int, int]:
        """What moves when the optimizer changed the parameters outside an inner step."""
        return (opt.epoch, opt.stats.state_downloads)

    async def _wait_for_gpu(self, gate: Gate, report: RoleReport) -> None:
        """Hold GPU work while the preferences forbid the GPU (averaging and serving state go on)."""
        log.info("waiting: the preferences do not allow the GPU now")
        report.reason = "waiting: the preferences do not allow the GPU now"
        while not gate.use_gpu:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GPU_WAIT_S):
                    await gate.wait_gpu()
        report.reason = ""
        log.info("the GPU is allowed again, training resumes")

    async def _epoch_began(self, epoch: int, elapsed: float, in_sync: bool) -> None:
        assert self._model is not None
        digest = await asyncio.to_thread(parameter_hash, self._model)
        report = EpochReport(epoch=int(epoch), time=elapsed, param_hash=digest, in_sync=bool(in_sync))
        self.epochs.append(report)
        if self._on_epoch is not None:
            self._on_epoch(report)

    async def _stream_next(self, batch_size: int) -> Batch:
        assert self._stream is not None
        return await self._stream.next_batch(batch_size)

    def _emit(
        self,
        opt: Any,
        report: RoleReport,
        elapsed: float,
        samples: int,
        rate: float,
        loss: float,
        train_losses: list[float],
    ) -> None:
        stats = opt.stats
        train = sum(train_losses) / len(train_losses) if train_losses else math.nan
        progress = Progress(
            time=elapsed,
            epoch=int(opt.epoch),
            samples=samples,
            samples_per_s=rate,
            loss=loss if not math.isnan(loss) else train,
            train_loss=train,
            peers=max(1, int(stats.peers)),
            rounds=int(stats.rounds_complete + stats.rounds_partial),
            averaging_s=float(stats.averaging_seconds),
        )
        report.throughput = rate
        report.peers = progress.peers
        self.history.append(progress)
        log.info("epoch %d, loss %.4f, %.0f samples/s, %d peers", progress.epoch, progress.loss, rate, progress.peers)
        if self._on_progress is not None:
            self._on_progress(progress)
