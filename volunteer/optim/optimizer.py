"""The collaborative optimizer: many peers train one model as if they were one big-batch optimizer.

Two modes (:class:`Mode`):

- ``grad`` (gradient averaging): each peer adds ``grad * batch_size`` to local accumulators at every
  :meth:`CollaborativeOptimizer.step`. When the swarm's progress records (:mod:`volunteer.optim.progress`)
  show ``target_batch_size`` samples for the current epoch, the peers average their accumulators *and* their
  sample counts (equal weights, so the quotient is the mean gradient over every sample of the swarm:
  ``sum_i S_i / sum_i n_i``, exact whatever each peer contributed), set it as the gradient, and all call the
  wrapped optimizer and scheduler once. Every peer then holds the same parameters and optimizer state.
- ``local`` (local updates, DiLoCo, arXiv 2311.08105, Algorithm 1): each peer runs the wrapped (inner)
  optimizer at every step on its own. Every epoch the peers average the *outer gradient* ``anchor - params``
  (weighted by samples, as above), reset the parameters to the anchor and apply an outer optimizer (SGD
  with Nesterov momentum, ``outer_lr``/``outer_momentum``); the result is the next anchor.

Matchmaking for the round of epoch ``e`` (group key ``<mode>.<e>``) starts pre-emptively as soon as the
progress ETA is shorter than the matchmaking window, so forming the group overlaps the last local steps; if
the target is reached before the group is formed, :meth:`~CollaborativeOptimizer.step` keeps returning
(the extra batches count towards this epoch) until it is, so only the all-reduce itself blocks training
(``overlap_matchmaking``).
A peer alone in the swarm steps alone (nothing to average). A round that cannot be formed or fails falls
back to the local update: the peer steps with its own gradient (or its own outer gradient), the failure is
LOGGED as a warning and counted in :attr:`CollaborativeOptimizer.stats` (``rounds_failed``), never reported
as a success and never raised. A peer whose epoch is behind the swarm's (it joined late, or was slow)
downloads parameters, optimizer state and the epoch from peers (:meth:`load_state_from_peers`).

API for the trainer role (stable)::

    opt = CollaborativeOptimizer(model, inner_opt, scheduler, node=dht, rpc=rpc, run_id="demo",
                                 config=CollaborativeConfig.from_spec(manifest.averaging))
    async with opt:                       # owns a TaskGroup: progress publisher, state advertisement,
        await opt.load_state_from_peers() #   pre-emptive matchmaking; (optional: late joiners)
        for batch in data:
            loss = task_loss(model, batch); loss.backward()
            await opt.step(len(batch))    # True when a global step (epoch) happened
        await opt.finish_epoch()          # optional: stop contributing, join the current epoch's round
    opt.epoch, opt.stats                  # OptimizerStats: samples/s, rounds ok/partial/failed, ...
    opt.in_sync                           # False while our state may differ from the swarm's

Staying in sync (issue 5: "every peer holds identical parameters at the start of each epoch"). Every peer
publishes, in its progress record, whether it is in sync and the digest of the state it holds at the start
of its epoch (:attr:`~volunteer.averaging.state_sync.StateServer.digest`: parameters and optimizer state;
in local mode parameters and outer state). A round that failed or was partial, or whose group left out
peers of the epoch (two groups may have formed and stepped apart), makes the peer *out of sync*: it
advertises its state under ``<run>/unsynced`` (not under the run's key, which joiners and the host's
checkpoints read) and, **before its step returns** (so the epoch it reports is right), waits up to
``resync_timeout`` until the epoch's state is decided and takes it: the digest most peers in sync hold
(:func:`~volunteer.optim.progress.canonical_state`; if nobody is in sync, the digest most peers hold, ties
to the smallest peer id), decided only once no peer is still in the epoch before (it may be finishing the
round that produces this one: :func:`~volunteer.optim.progress.settled`) and most peers seen in the run
lately hold a state of this epoch (a peer cut off from the others sees their records go stale and must not
find itself the only voter; nor does a peer that stepped alone while others were known claim to be in
sync); a peer that does not hold it
downloads it (checked against the digest). Peers in sync keep checking at every refresh, so a peer that
finds the others in sync hold another state says so (a warning) and downloads it. A peer that cannot settle
in time says so and keeps trying at its next steps; :attr:`CollaborativeOptimizer.in_sync` tells.

Mixed precision: pass ``scaler`` (a ``torch.amp.GradScaler``) and call ``scaler.scale(loss).backward()``;
the optimizer unscales, skips batches whose gradients overflowed and updates the scale. ``offload`` keeps
the gradient accumulators / DiLoCo anchor on the CPU (for GPU peers short of memory); the averaging buffers
are always on the CPU. Tensor math on large models runs in ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from coordinator_free_dht.errors import DHTError
from coordinator_free_dht.identity import PeerID
from coordinator_free_dht.net.rpc import RPC, PeerInfo
from coordinator_free_dht.node import DHTNode
from volunteer.averaging.averager import Averager, AveragerConfig, AveragingResult, Group, RoundStatus
from volunteer.averaging.matchmaking import FormedGroup, Matchmaker, MatchmakingConfig, ReadyInfo
from volunteer.averaging.state_sync import (
    StateDownload,
    StateServer,
    StateSnapshot,
    SyncConfig,
    advertise_state,
    find_donors,
)
from volunteer.errors import AveragingError, MatchmakingError, OptimError, StateSyncError
from volunteer.optim.progress import (
    GlobalProgress,
    LocalProgress,
    ProgressConfig,
    ProgressTracker,
    canonical_state,
    settled,
)
from volunteer.tensors.adaptive import AdaptiveCompression, TensorRole
from volunteer.tensors.codecs import CodecId, Compression

if TYPE_CHECKING:
    from volunteer.run.manifest import AveragingSpec

__all__ = ["CollaborativeConfig", "CollaborativeOptimizer", "Mode", "OptimizerStats"]

logger = logging.getLogger(__name__)

_Scheduler = torch.optim.lr_scheduler.LRScheduler
_DOWNLOAD_ATTEMPTS = 3
_WITHDRAW_TIMEOUT = 2.0


class Mode(enum.StrEnum):
    """How peers combine their work (see the module docstring)."""

    GRAD = "grad"
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class CollaborativeConfig:
    """Settings of the collaborative optimizer (usually from a run manifest's ``averaging`` table)."""

    mode: Mode = Mode.GRAD
    """``grad``: average gradients every epoch; ``local``: DiLoCo inner steps and an outer step per epoch."""
    target_batch_size: int = 4096
    """Samples the whole swarm accumulates per epoch (one global step)."""
    min_group_size: int = 2
    """Smallest averaging group worth forming."""
    max_group_size: int = 16
    """Largest averaging group."""
    matchmaking_time: float = 5.0
    """Seconds to gather a group (the matchmaking window)."""
    allreduce_timeout: float = 60.0
    """Seconds one all-reduce may take."""
    state_sync_timeout: float = 120.0
    """Seconds a state download may take."""
    epoch_timeout: float = 600.0
    """Seconds :meth:`CollaborativeOptimizer.finish_epoch` waits for the swarm to reach the target before it
    averages with whoever is ready."""
    outer_lr: float = 0.7
    """Local mode: outer learning rate."""
    outer_momentum: float = 0.9
    """Local mode: outer Nesterov momentum."""
    compression: Compression | None = None
    """Codec of the averaged tensors; ``None``: adaptive by role and size (gradients or parameters)."""
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    """Progress publishing and refresh."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """State download settings."""
    state_ttl: float = 60.0
    """Seconds a state advertisement stays in the DHT (republished at half that)."""
    resync_timeout: float | None = None
    """Seconds a peer that may have diverged (its round failed or was partial, or its group left out peers
    of its epoch) waits, before its step returns, until the swarm's state for its new epoch is decided and
    downloaded if it is not ours. Past that it reports the epoch out of sync and keeps checking at later
    steps. None: long enough for the other peers to finish the round they may be in (two matchmaking
    windows, the all-reduce timeout, and 5 s), see :attr:`settle_timeout`."""
    idle_after: float = 10.0
    """Seconds without a step after which our progress record says 0 samples/s: a peer that is paused (the
    owner is at the machine, the GPU is not allowed) and has no samples in its epoch is *idle*, and idle peers
    neither hold up nor vote on the decisions of the swarm (see :attr:`~volunteer.optim.progress.LocalProgress.idle`)."""
    overlap_matchmaking: bool = True
    """When the swarm reaches the target before our group is formed, keep training (those batches count
    towards this epoch) instead of waiting for the matchmaking window to end."""
    offload: bool = False
    """Keep gradient accumulators and the DiLoCo anchor on the CPU (GPU peers short of memory)."""
    offload_elements: int = 1 << 16
    """Tensor math over at least this many elements in total runs in a worker thread."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        if self.target_batch_size < 1:
            raise OptimError("target_batch_size must be at least 1")
        if not 1 <= self.min_group_size <= self.max_group_size:
            raise OptimError("need 1 <= min_group_size <= max_group_size")
        if (
            min(
                self.matchmaking_time,
                self.allreduce_timeout,
                self.state_sync_timeout,
                self.epoch_timeout,
                self.settle_timeout,
            )
            <= 0
        ):
            raise OptimError("every time limit must be positive")
        if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise OptimError("outer_lr must be positive and outer_momentum in [0, 1)")

    @property
    def settle_timeout(self) -> float:
        """:attr:`resync_timeout`, or its default from the other time limits."""
        if self.resync_timeout is not None:
            return self.resync_timeout
        return 2 * self.matchmaking_time + self.allreduce_timeout + 5.0

    @classmethod
    def from_spec(cls, spec: AveragingSpec, **overrides: Any) -> CollaborativeConfig:
        """The config a manifest's ``averaging`` table describes (``overrides`` replace fields)."""
        name = spec.compression.gradients if spec.mode == "grad" else spec.compression.parameters
        values: dict[str, Any] = {
            "mode": Mode(spec.mode),
            "target_batch_size": spec.target_batch_size,
            "min_group_size": spec.min_group_size,
            "max_group_size": spec.max_group_size,
            "matchmaking_time": spec.matchmaking_time,
            "allreduce_timeout": spec.allreduce_timeout,
            "state_sync_timeout": spec.state_sync_timeout,
            "outer_lr": spec.outer_lr,
            "outer_momentum": spec.outer_momentum,
            "compression": None if name == "adaptive" else Compression(CodecId(name)),
        }
        values.update(overrides)
        return cls(**values)


@dataclass(slots=True)
class OptimizerStats:
    """What the optimizer did so far (for the dashboard, the demo summary and the benchmark)."""

    epoch: int = 0
    """Current epoch (global steps taken)."""
    samples: int = 0
    """Samples this peer processed in total."""
    samples_per_second: float = 0.0
    """This peer's recent throughput."""
    swarm_samples_per_second: float = 0.0
    """The swarm's throughput, from the progress records."""
    peers: int = 0
    """Peers with a fresh progress record."""
    rounds_complete: int = 0
    """Averaging rounds in which every part was averaged with every member."""
    rounds_partial: int = 0
    """Rounds in which some parts or members were missing (logged)."""
    rounds_failed: int = 0
    """Rounds that could not be formed or averaged nothing: the local update was used (logged)."""
    rounds_solo: int = 0
    """Epochs stepped alone because no other peer was in the swarm."""
    averaging_seconds: float = 0.0
    """Time spent in matchmaking waits and all-reduce (after the batch was complete)."""
    group_sizes: list[int] = field(default_factory=list)
    """Size of the group of each averaging round, in order."""
    state_downloads: int = 0
    """Times the state was downloaded from peers."""
    skipped_batches: int = 0
    """Batches skipped because their (mixed precision) gradients overflowed."""


def _parameters(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(params, nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    return list(params)


class CollaborativeOptimizer:
    """Wraps a ``torch.optim.Optimizer`` (and LR scheduler) for training with the swarm; see the module docs.

    Construction registers RPC handlers (matchmaking, averaging, state serving) and starts nothing;
    ``async with`` starts the background tasks and stops them on exit.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: _Scheduler | None = None,
        *,
        node: DHTNode,
        rpc: RPC | None = None,
        run_id: str,
        config: CollaborativeConfig | None = None,
        scaler: torch.amp.GradScaler | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.params = _parameters(params)
        if not self.params:
            raise OptimError("no parameters to train")
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) not in known for p in self.params):
            raise OptimError("the optimizer does not train every parameter given")
        self.opt = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.node = node
        self.rpc = rpc or node.rpc
        self.run_id = run_id
        self.config = config = config or CollaborativeConfig()
        self.rng = rng or random.Random()
        self.clock = node.clock
        self.epoch = 0
        """The number of global steps this peer has taken part in (or downloaded)."""
        self.stats = OptimizerStats()
        self.tracker = ProgressTracker(node, run_id, config.target_batch_size, config.progress)
        self.matchmaker = Matchmaker(
            node,
            self.rpc,
            MatchmakingConfig(
                prefix=run_id,
                target_group_size=config.max_group_size,
                min_group_size=max(2, config.min_group_size),
                window=config.matchmaking_time,
                # Peers of the epoch that start matchmaking late are waited for (up to one more window),
                # so the swarm forms one group rather than two that step apart; joins wait as long.
                late_window=config.matchmaking_time,
                join_timeout=max(2.0, 2 * config.matchmaking_time + 1.0),
            ),
            rng=random.Random(self.rng.random()),
        )
        numel = sum(p.numel() for p in self.params)
        role = TensorRole.GRADIENT if config.mode is Mode.GRAD else TensorRole.PARAMETER
        compression = config.compression or AdaptiveCompression().choose_for(numel, torch.float32, role)
        sender_timeout = max(1.0, config.allreduce_timeout / 4)
        self.averager = Averager(
            self.rpc,
            AveragerConfig(
                compression=compression,
                sender_timeout=sender_timeout,
                reducer_timeout=2 * sender_timeout,
                round_timeout=config.allreduce_timeout,
                join_timeout=config.matchmaking_time + sender_timeout,
            ),
        )
        self.state_server = StateServer(self.rpc, config.sync)
        self._numel = numel
        store = torch.device("cpu") if config.offload else None
        self._local_samples = 0
        self._accumulators: list[torch.Tensor] = []
        self._anchor: list[torch.Tensor] = []
        self._outer: torch.optim.SGD | None = None
        if config.mode is Mode.GRAD:
            self._accumulators = [torch.zeros_like(p, device=store or p.device) for p in self.params]
        else:
            self._anchor = [p.detach().to(store or p.device, copy=True) for p in self.params]
            self._outer = torch.optim.SGD(
                self.params, lr=config.outer_lr, momentum=config.outer_momentum, nesterov=config.outer_momentum > 0
            )
        self._view: GlobalProgress | None = None
        self._next_refresh = -math.inf
        self._last_step_time: float | None = None
        self._matchmaking: asyncio.Task[FormedGroup | MatchmakingError] | None = None
        self._matchmaking_epoch = -1
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._background: list[asyncio.Task[None]] = []
        self._round_lock = asyncio.Lock()
        self._in_sync = True
        self._next_check = -math.inf
        self._suspects: frozenset[PeerID] = frozenset()

    # --- lifetime ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> CollaborativeOptimizer:
        stack = contextlib.AsyncExitStack()
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        stack.push_async_callback(self._stop_background)
        self._stack = stack
        await self._publish_state()
        await self._refresh()
        self._background = [
            self._tg.create_task(self._progress_loop(), name="optim-progress"),
            self._tg.create_task(self._advertise_loop(), name="optim-advertise"),
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            if exc_type is None:
                await self._finish_pending_round()
            await stack.__aexit__(exc_type, exc, tb)
        self._tg = None

    async def _finish_pending_round(self) -> None:
        """Leaving normally while our group for this epoch forms or has formed: take part in its round, so the
        other members do not wait for our parts and end with a partial round. Bounded; failures are logged."""
        task = self._matchmaking if self._matchmaking_epoch == self.epoch else None
        view = self._view
        if task is None or view is None:
            return
        limit = 2 * self.config.matchmaking_time + self.config.allreduce_timeout
        try:
            async with asyncio.timeout(limit):
                formed = await asyncio.shield(task)
                if isinstance(formed, FormedGroup):
                    logger.info("leaving: taking part in the round of epoch %d our group is in", self.epoch)
                    await self._global_step(view, leaving=True)
        except TimeoutError:
            logger.warning("leaving: the round of epoch %d did not finish within %gs", self.epoch, limit)

    async def _stop_background(self) -> None:
        tasks = [*self._background]
        if self._matchmaking is not None:
            tasks.append(self._matchmaking)  # type: ignore[arg-type]
        for task in tasks:
            task.cancel()
        self._background = []
        self._matchmaking = None
        # Leaving: the others should not wait for us (a fresh record of ours would hold up their decisions).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_WITHDRAW_TIMEOUT):
                await self.tracker.withdraw()

    def _task_group(self) -> asyncio.TaskGroup:
        if self._tg is None:
            raise OptimError("use the optimizer inside `async with`")
        return self._tg

    # --- the trainer's calls -----------------------------------------------------------------------------

    async def step(self, batch_size: int) -> bool:
        """Account for one local batch whose gradients are in ``.grad``; take a global step when the swarm
        reached the target. Returns True if the epoch advanced (a global step or a state download)."""
        self._task_group()
        if batch_size < 0:
            raise OptimError("batch_size must be non-negative")
        if batch_size > 0 and not self._take_batch(batch_size):
            return False
        self._update_rate(batch_size)
        pending = self._matchmaking if self._matchmaking_epoch == self.epoch else None
        if pending is not None and self._view is not None and self._view.ready:
            if pending.done() or not self.config.overlap_matchmaking:
                await self._global_step(self._view)
                return True
            return False  # the group is still forming: this batch counts towards the epoch too
        view = await self._maybe_refresh()
        if view.epoch > self.epoch:
            return await self._catch_up(view)
        if self.clock.time() >= self._next_check:
            await self._check_sync(view)
        if view.ready:
            self._start_matchmaking()
            pending = self._matchmaking if self._matchmaking_epoch == self.epoch else None
            if pending is None or pending.done() or not self.config.overlap_matchmaking:
                await self._global_step(view)
                return True
            return False
        if view.eta <= self.config.matchmaking_time + self.tracker.refresh_interval(view):
            self._start_matchmaking()
        return False

    async def finish_epoch(self) -> bool:
        """Contribute no more samples to this epoch: wait (up to ``epoch_timeout``) until the swarm reaches the
        target, then take part in the round. For a trainer that pauses or leaves; returns as :meth:`step`."""
        self._task_group()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.epoch_timeout
        while True:
            view = await self._refresh()
            if view.epoch > self.epoch:
                return await self._catch_up(view)
            if view.ready or loop.time() >= deadline:
                if not view.ready:
                    logger.warning(
                        "epoch %d: the swarm has %d of %d samples after %gs; averaging with whoever is ready",
                        self.epoch,
                        view.samples,
                        view.target_batch_size,
                        self.config.epoch_timeout,
                    )
                await self._global_step(view)
                return True
            if view.eta <= self.config.matchmaking_time + self.tracker.refresh_interval(view):
                self._start_matchmaking()
            await asyncio.sleep(min(self.tracker.refresh_interval(view), max(0.0, deadline - loop.time())))

    async def load_state_from_peers(self, *, newer_only: bool = False) -> bool:
        """Download parameters, optimizer state and epoch from the peers with the newest state. False if no
        donor has a state as new as ours (``newer_only``: newer than ours) or every donor failed (logged);
        never raises for network faults. Where the progress records show which state the peers in sync
        hold at that epoch (:func:`~volunteer.optim.progress.canonical_state`), only that state is taken."""
        try:
            donors = await find_donors(self.node, self.run_id)
        except DHTError as exc:
            logger.warning("could not look up state donors: %s", exc)
            return False
        if not donors or donors[0][0] < self.epoch or (newer_only and donors[0][0] == self.epoch):
            return False
        newest = donors[0][0]
        view = self._view or await self._refresh()
        canonical = canonical_state([r for r in view.records if r.in_sync], newest)
        digest = canonical[0] if canonical is not None else None
        return await self._download([peer for epoch, peer in donors if epoch == newest], digest=digest)

    @property
    def in_sync(self) -> bool:
        """False while this peer knows or suspects that its state differs from the swarm's: after a failed
        or partial round, or a round whose group left out peers of its epoch, until the swarm's state for
        the epoch is decided (from the digests in the progress records) and, if it is not ours, downloaded;
        also when a peer in sync sees that the peers in sync hold another state than it does."""
        return self._in_sync

    async def _download(
        self,
        peers: list[PeerInfo],
        *,
        in_sync: bool = True,
        digest: bytes | None = None,
        unsynced_ok: bool = False,
        transfer_limit: float | None = None,
    ) -> bool:
        download = StateDownload(self.rpc, self.config.sync, rng=random.Random(self.rng.random()))
        limit = self.config.state_sync_timeout
        if transfer_limit is not None:
            limit = min(limit, transfer_limit)
        try:
            # Only the transfer is timed: once the state is here it is applied and published in full.
            async with asyncio.timeout(max(0.0, limit)):
                for attempt in range(_DOWNLOAD_ATTEMPTS):
                    try:
                        state = await download.run(peers, digest=digest, unsynced_ok=unsynced_ok)
                        break
                    except StateSyncError as exc:
                        # Donors that moved to a newer epoch mid-download refuse the old one; a new attempt
                        # reads their manifests again and resumes (or restarts at the newer epoch).
                        if attempt == _DOWNLOAD_ATTEMPTS - 1:
                            raise
                        logger.info("state download attempt %d failed (%s); retrying", attempt + 1, exc)
        except (StateSyncError, TimeoutError) as exc:
            logger.warning("state download from %d donor(s) failed: %s", len(peers), exc or "timed out")
            return False
        try:
            self._apply_state(state.epoch, dict(state.metadata), state.tensors)
        except (OptimError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            logger.warning("the downloaded state does not fit our model: %s", exc)
            return False
        self.stats.state_downloads += 1
        logger.info("downloaded the state of epoch %d from %d donor(s)", state.epoch, len(peers))
        self._in_sync = in_sync
        self._drop_matchmaking_of_other_epochs()
        await self._publish_state()
        await self._publish()
        return True

    # --- local work --------------------------------------------------------------------------------------

    def _take_batch(self, batch_size: int) -> bool:
        """Fold one batch's gradients in (grad mode) or take the inner step (local mode); False if skipped."""
        scaler = self.scaler
        if self.config.mode is Mode.LOCAL:
            if scaler is not None:
                scale_before = scaler.get_scale()
                scaler.step(self.opt)
                scaler.update()
                skipped = scaler.get_scale() < scale_before
            else:
                skipped = not self._grads_finite()
                if not skipped:
                    self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            if scaler is not None:
                scaler.unscale_(self.opt)
            skipped = not self._grads_finite()
            if not skipped:
                with torch.no_grad():
                    for acc, p in zip(self._accumulators, self.params, strict=True):
                        if p.grad is not None:
                            acc.add_(p.grad.to(acc.device), alpha=float(batch_size))
            if scaler is not None:
                scaler.update()
            self.opt.zero_grad(set_to_none=True)
        if skipped:
            self.stats.skipped_batches += 1
            logger.info("skipped a batch of %d whose gradients are not finite", batch_size)
            return False
        self._local_samples += batch_size
        self.stats.samples += batch_size
        return True

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        total = torch.stack([g.float().sum() for g in grads]).sum()
        return bool(torch.isfinite(total))

    def _update_rate(self, batch_size: int) -> None:
        now = self.clock.time()
        last, self._last_step_time = self._last_step_time, now
        if last is None or now <= last or batch_size == 0:
            return
        rate = batch_size / (now - last)
        old = self.stats.samples_per_second
        self.stats.samples_per_second = rate if old == 0 else 0.8 * old + 0.2 * rate

    # --- progress ----------------------------------------------------------------------------------------

    async def _publish(self) -> None:
        digest = self.state_server.digest if self.state_server.epoch == self.epoch else b""
        last = self._last_step_time
        working = last is not None and self.clock.time() - last < self.config.idle_after
        record = LocalProgress(
            self.node.peer_id,
            self.epoch,
            self._local_samples,
            self.stats.samples_per_second if working else 0.0,
            self.clock.time(),
            self._in_sync,
            digest,
        )
        await self.tracker.publish(record)

    async def _refresh(self) -> GlobalProgress:
        await self._publish()
        view = await self.tracker.fetch()
        self._view = view
        self._next_refresh = self.clock.time() + self.tracker.refresh_interval(view)
        self.stats.swarm_samples_per_second = view.samples_per_second
        self.stats.peers = view.num_peers
        return view

    async def _maybe_refresh(self) -> GlobalProgress:
        view = self._view
        now = self.clock.time()
        if view is None or now >= self._next_refresh:
            return await self._refresh()
        mine = self.tracker.mine
        published = mine.samples if mine is not None and mine.epoch == self.epoch else 0
        others_rate = max(0.0, view.samples_per_second - self.stats.samples_per_second)
        estimate = view.samples + (self._local_samples - published) + others_rate * (now - view.time)
        if estimate >= view.target_batch_size:
            return await self._refresh()
        return view

    async def _progress_loop(self) -> None:
        while True:
            view = self._view
            await asyncio.sleep(self.tracker.refresh_interval(view))
            if self.clock.time() >= self._next_refresh:
                await self._refresh()

    async def _advertise_loop(self) -> None:
        while True:
            await self._advertise()
            await asyncio.sleep(self.config.state_ttl / 2)

    async def _advertise(self) -> None:
        """Advertise our state: under the run's key while in sync, under ``<run>/unsynced`` otherwise, so
        joiners and resynchronising peers only download from peers in sync with the swarm."""
        self.state_server.in_sync = self._in_sync
        epoch = self.state_server.epoch
        if epoch is None:
            return
        prefix = self.run_id if self._in_sync else f"{self.run_id}/unsynced"
        try:
            await advertise_state(self.node, prefix, epoch, self._me().peer, ttl=self.config.state_ttl)
        except DHTError as exc:
            logger.info("could not advertise our state: %s", exc)

    async def _check_sync(self, view: GlobalProgress, transfer_limit: float | None = None) -> bool:
        """Compare our state with the swarm's for our epoch (see :func:`canonical_state`) once that epoch is
        settled: in sync if we hold it, else download it from its holders. True if we are in sync after."""
        self._next_check = self.clock.time() + self.tracker.refresh_interval(view)
        # (The swarm's epoch may lag ours while only peers out of sync are in it: decide ours all the same.)
        if view.epoch > self.epoch or not settled(view.records, self.epoch, self._ignored(view)):
            return self._in_sync
        # A quorum: most of the peers known lately hold a state of our epoch (a peer cut off from the others
        # sees their records go stale and would otherwise find itself the only voter).
        voters = sum(1 for r in view.records if r.epoch == self.epoch and r.digest)
        if 2 * voters <= view.known_peers:
            return self._in_sync
        canonical = canonical_state(view.records, self.epoch)
        mine = self.state_server.digest if self.state_server.epoch == self.epoch else b""
        if canonical is None or not mine:
            return self._in_sync
        digest, holders = canonical
        if digest == mine:
            if not self._in_sync:
                others = len(holders) - (self.node.peer_id in holders)
                logger.info(
                    "epoch %d: our state is the swarm's (held by %d other peer(s) in its epoch); in sync again",
                    self.epoch,
                    others,
                )
                self._in_sync = True
                await self._advertise()
                await self._publish()
            return True
        if self._in_sync:
            logger.warning(
                "epoch %d: the swarm holds another state than ours (%d peer(s) hold it); out of sync, downloading it",
                self.epoch,
                len(holders),
            )
            self._in_sync = False
            await self._advertise()
            await self._publish()
        return await self._download_from(holders, digest, self.epoch, transfer_limit=transfer_limit)

    def _ignored(self, view: GlobalProgress) -> frozenset[PeerID]:
        """Peers whose records in the epoch before ours do not hold up the decision of our epoch's state: the
        members that failed in our last round (if they come, they come out of sync). A record that merely
        looks old is not ignored: its peer may be cut off or slow rather than dead (a peer that leaves
        withdraws its record; one that dies stops counting after ``stale_after``)."""
        del view
        return self._suspects

    async def _download_from(
        self, holders: Sequence[PeerID], digest: bytes, epoch: int, *, transfer_limit: float | None = None
    ) -> bool:
        """Download the state ``digest`` of ``epoch`` from some of ``holders`` (found through their state
        advertisements, in sync or not). True once we hold it (we are then in sync)."""
        wanted = set(holders) - {self.node.peer_id}
        peers: dict[PeerID, PeerInfo] = {}
        for prefix in (self.run_id, f"{self.run_id}/unsynced"):
            try:
                found = await find_donors(self.node, prefix)
            except DHTError as exc:
                logger.info("could not look up state donors: %s", exc)
                continue
            peers.update((p.peer_id, p) for e, p in found if p.peer_id in wanted and e == epoch)
        if not peers:
            logger.info("epoch %d: no advertisement of the swarm's state yet; trying again later", epoch)
            return False
        return await self._download(
            list(peers.values()), digest=digest, unsynced_ok=True, transfer_limit=transfer_limit
        )

    async def _settle(self) -> None:
        """After a round that may have left us apart from the swarm: wait (up to ``resync_timeout``) until our
        epoch's state is decided, and take it. Says so if that does not happen in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.settle_timeout
        while True:
            view = await self._refresh()
            if view.epoch > self.epoch:
                await self._catch_up(view)
                if self._in_sync:
                    return
            elif await self._check_sync(view, transfer_limit=deadline - loop.time()):
                return
            if loop.time() >= deadline:
                logger.warning(
                    "epoch %d: still out of sync with the swarm after %gs (its state is not decided or could "
                    "not be downloaded); our parameters may differ from the other peers' until we resynchronise",
                    self.epoch,
                    self.config.settle_timeout,
                )
                return
            await asyncio.sleep(self.tracker.config.min_refresh)

    # --- averaging ---------------------------------------------------------------------------------------

    def _me(self) -> ReadyInfo:
        info = self.rpc.info if self.rpc.info.addresses else self.node.peer_info
        return ReadyInfo(info, weight=1.0)

    def _start_matchmaking(self) -> None:
        if self._matchmaking is not None and self._matchmaking_epoch == self.epoch:
            return
        view = self._view
        if view is not None and view.num_peers <= 1:
            return
        self._matchmaking_epoch = self.epoch
        key = f"{self.config.mode}.{self.epoch}"
        expected = view.num_peers_in_epoch if view is not None and view.epoch == self.epoch else 0
        self._matchmaking = self._task_group().create_task(self._form_group(key, expected), name=f"optim-match-{key}")

    async def _form_group(self, key: str, expected: int) -> FormedGroup | MatchmakingError:
        try:
            return await self.matchmaker.form_group(key, self._me(), expected=expected)
        except MatchmakingError as exc:
            return exc

    async def _catch_up(self, view: GlobalProgress) -> bool:
        logger.info("the swarm is at epoch %d and we are at %d: downloading its state", view.epoch, self.epoch)
        self._drop_matchmaking()
        canonical = canonical_state(view.records, view.epoch)
        if canonical is not None:
            digest, holders = canonical
            synced = any(r.in_sync for r in view.records if r.epoch == view.epoch and r.digest == digest)
            if await self._download_from(holders, digest, view.epoch):
                self._in_sync = synced
                if not synced:
                    await self._advertise()
                    await self._publish()
                return True
        if await self.load_state_from_peers(newer_only=True):
            return True
        # No peer in sync has it: take the state of a peer out of sync (and stay out of sync ourselves).
        try:
            unsynced = await find_donors(self.node, f"{self.run_id}/unsynced")
        except DHTError as exc:
            logger.info("could not look up out-of-sync peers: %s", exc)
            unsynced = []
        newest = [peer for epoch, peer in unsynced if epoch == view.epoch]
        if newest and await self._download(newest, in_sync=False, unsynced_ok=True):
            return True
        # Nobody could give us the state: move to the swarm's epoch with our own parameters rather than
        # stall (our samples would never count otherwise); we are out of sync until a resynchronisation.
        logger.warning(
            "could not download the state of epoch %d; continuing from our own (epoch %d) parameters, out of sync",
            view.epoch,
            self.epoch,
        )
        self.epoch = self.stats.epoch = view.epoch
        self._reset_epoch_work()
        self._in_sync = False
        await self._publish_state()
        await self._publish()
        return True

    def _reset_epoch_work(self) -> None:
        """Forget this epoch's local work (accumulated gradients; in local mode, restart from the anchor)."""
        with torch.no_grad():
            for acc in self._accumulators:
                acc.zero_()
            if self._anchor:  # local mode only (gradient mode has no anchor)
                for a, p in zip(self._anchor, self.params, strict=True):
                    a.copy_(p.detach())
        self._local_samples = 0

    def _drop_matchmaking(self) -> None:
        if self._matchmaking is not None:
            self._matchmaking.cancel()
        self._matchmaking = None
        self._matchmaking_epoch = -1

    def _drop_matchmaking_of_other_epochs(self) -> None:
        if self._matchmaking is not None and self._matchmaking_epoch != self.epoch:
            self._drop_matchmaking()

    async def _global_step(self, view: GlobalProgress, *, leaving: bool = False) -> None:
        async with self._round_lock:
            start = asyncio.get_running_loop().time()
            tensors, local_copy = await self._cpu(self._round_inputs)
            averaged, why, group = await self._average(view, tensors)
            self.stats.averaging_seconds += asyncio.get_running_loop().time() - start
            await self._cpu(self._apply_round, tensors, local_copy, averaged)
            suspect = why is not None
            if why is not None:
                logger.warning("epoch %d: %s; applied the local update instead", self.epoch, why)
                self._in_sync = False
            elif averaged is None and view.known_peers <= 1:  # alone in the swarm: our state is the swarm's
                self._in_sync = True
            elif averaged is None:
                # We stepped alone, yet other peers were in the run lately: cut off from them, or they left
                # without a word. Our state is ours until compared with theirs.
                logger.warning(
                    "epoch %d: stepped alone while %d other peer(s) were in the run lately; out of sync until"
                    " compared with theirs",
                    self.epoch,
                    view.known_peers - 1,
                )
                suspect = True
            elif group is not None and len(group.members) < view.num_peers_in_epoch:
                # Peers of our epoch were left out of our group: they may have averaged in another group (or
                # not at all) and stepped differently. Compare states before claiming the epoch.
                logger.info(
                    "epoch %d: our group of %d left out %d peer(s) of our epoch; checking our state against theirs",
                    self.epoch,
                    len(group.members),
                    view.num_peers_in_epoch - len(group.members),
                )
                suspect = True
            if suspect:
                self._in_sync = False
            self.epoch += 1
            self.stats.epoch = self.epoch
            self._local_samples = 0
            self._drop_matchmaking()
            await self._publish_state()
            await self._refresh()
        if suspect and not leaving:
            # Before the epoch counts: find out which state the swarm holds now, and take it if it is not ours.
            await self._settle()

    def _failed_members(self, result: AveragingResult | None, group: Group | None) -> frozenset[PeerID]:
        if result is None or group is None:
            return frozenset()
        return frozenset(group.members[i].peer.peer_id for i in result.failures if 0 <= i < len(group.members))

    async def _average(
        self, view: GlobalProgress, tensors: list[torch.Tensor]
    ) -> tuple[AveragingResult | None, str | None, Group | None]:
        """Run the round; (result, None, group) on success, (None or a partial result, reason, group or None)
        on fallback."""
        if view.num_peers <= 1 and self._matchmaking is None:
            self.stats.rounds_solo += 1
            return None, None, None
        self._start_matchmaking()
        task = self._matchmaking
        if task is None:
            self.stats.rounds_solo += 1
            return None, None, None
        formed = await task
        self._suspects = frozenset()
        if isinstance(formed, MatchmakingError):
            self.stats.rounds_failed += 1
            return None, f"no averaging group ({formed})", None
        group = formed.group
        self.stats.group_sizes.append(len(group.members))
        try:
            result = await self.averager.average(tensors, group)
        except AveragingError as exc:
            self.stats.rounds_failed += 1
            return None, f"averaging failed ({exc})", group
        self._suspects = frozenset()
        if result.status is RoundStatus.COMPLETE:
            self.stats.rounds_complete += 1
            return result, None, group
        if result.status is RoundStatus.FAILED:
            self.stats.rounds_failed += 1
            self._suspects = self._failed_members(result, group)
            return None, f"averaging failed ({result.summary()})", group
        self.stats.rounds_partial += 1
        self._suspects = self._failed_members(result, group)
        count_index = len(tensors) - 1
        if not all(o.averaged for o in result.parts if o.part.tensor == count_index):
            self._suspects = self._failed_members(result, group)
            return None, f"the sample count was not averaged ({result.summary()})", group
        return result, f"partial round ({result.summary()}); parts not averaged keep local values", group

    def _round_inputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """CPU tensors to average (sample-weighted sums, then the sample count) and a copy of them."""
        n = float(self._local_samples)
        with torch.no_grad():
            if self.config.mode is Mode.GRAD:
                sums = [acc.detach().to("cpu", torch.float32, copy=True) for acc in self._accumulators]
            else:
                sums = [
                    (a.to(p.device) - p.detach()).to("cpu", torch.float32).mul_(n)
                    for a, p in zip(self._anchor, self.params, strict=True)
                ]
        tensors = [*sums, torch.tensor([n], dtype=torch.float64)]
        return tensors, [t.clone() for t in tensors]

    def _apply_round(
        self, tensors: list[torch.Tensor], local_copy: list[torch.Tensor], result: AveragingResult | None
    ) -> None:
        """Turn the (averaged or local) sums into the update and take the global step."""
        if result is None:
            tensors = local_copy
        count = float(tensors[-1].item())
        local_count = float(local_copy[-1].item())
        with torch.no_grad():
            updates = [t / count if count > 0 else torch.zeros_like(t) for t in tensors[:-1]]
            if result is not None:
                for outcome in result.parts:
                    part = outcome.part
                    if outcome.averaged or part.tensor >= len(updates):
                        continue
                    flat = updates[part.tensor].view(-1)
                    local = local_copy[part.tensor].view(-1)[part.start : part.end]
                    flat[part.start : part.end] = local / local_count if local_count > 0 else 0.0
            if self.config.mode is Mode.GRAD:
                for p, g in zip(self.params, updates, strict=True):
                    p.grad = g.to(p.device, p.dtype).view_as(p)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if self.scheduler is not None:
                    self.scheduler.step()
                for acc in self._accumulators:
                    acc.zero_()
            else:
                assert self._outer is not None
                for p, a, g in zip(self.params, self._anchor, updates, strict=True):
                    p.copy_(a.to(p.device))
                    p.grad = g.to(p.device, p.dtype).view_as(p)
                self._outer.step()
                self._outer.zero_grad(set_to_none=True)
                if self.scheduler is not None:
                    self.scheduler.step()
                for p, a in zip(self.params, self._anchor, strict=True):
                    a.copy_(p.detach())

    async def _cpu(self, fn: Any, *args: Any) -> Any:
        if self._numel >= self.config.offload_elements:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    # --- state -------------------------------------------------------------------------------------------

    def _state_tensors(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Metadata and tensors of our state: parameters, optimizer state, outer momentum, scheduler."""
        tensors = [p.detach().to("cpu", copy=True) for p in self.params]
        layout: list[list[Any]] = []
        scalars: list[list[Any]] = []
        optimizers: list[tuple[str, torch.optim.Optimizer]] = [("inner", self.opt)]
        if self._outer is not None:
            optimizers.append(("outer", self._outer))
        for which, opt in optimizers:
            for i, p in enumerate(self.params):
                for name, value in sorted(opt.state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor):
                        layout.append([which, i, name])
                        tensors.append(value.detach().to("cpu", copy=True))
                    elif isinstance(value, int | float | bool):
                        scalars.append([which, i, name, value])
        metadata: dict[str, Any] = {
            "epoch": self.epoch,
            "mode": str(self.config.mode),
            "layout": layout,
            "scalars": scalars,
            "lrs": [float(g["lr"]) for g in self.opt.param_groups],
        }
        if self.scheduler is not None:
            metadata["scheduler"] = [int(self.scheduler.last_epoch), int(getattr(self.scheduler, "_step_count", 0))]
        if self.config.mode is Mode.LOCAL:
            # Peers in sync share the parameters and the outer optimizer's state; each keeps its own inner
            # optimizer state (DiLoCo), so the state's digest leaves that out.
            n = len(self.params)
            metadata["digest_tensors"] = [*range(n), *(n + k for k, e in enumerate(layout) if e[0] == "outer")]
        return metadata, tensors

    async def _publish_state(self) -> None:
        self.state_server.in_sync = self._in_sync and self.state_server.in_sync  # never a new state as in sync early
        metadata, tensors = await self._cpu(self._state_tensors)
        await self.state_server.publish(StateSnapshot(self.epoch, metadata, tuple(tensors)))
        await self._advertise()

    def _apply_state(self, epoch: int, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        """Load a downloaded state (checked against our model first; :class:`OptimError` if it does not fit)."""
        n = len(self.params)
        layout, scalars = metadata.get("layout"), metadata.get("scalars")
        if metadata.get("mode") != str(self.config.mode) or not isinstance(layout, list):
            raise OptimError("the state is from another mode or has no layout")
        if not isinstance(scalars, list) or len(tensors) != n + len(layout):
            raise OptimError("the state's tensors do not match its layout")
        for p, t in zip(self.params, tensors[:n], strict=True):
            if t.shape != p.shape or t.dtype != p.dtype:
                raise OptimError(f"a parameter arrived as {list(t.shape)} {t.dtype}, expected {list(p.shape)}")
        opts: dict[str, torch.optim.Optimizer] = {"inner": self.opt}
        if self._outer is not None:
            opts["outer"] = self._outer
        new_state: dict[str, dict[int, dict[str, Any]]] = {k: {} for k in opts}
        for entry, tensor in zip(layout, tensors[n:], strict=True):
            which, i, name = entry
            if which not in opts or not isinstance(i, int) or not 0 <= i < n or not isinstance(name, str):
                raise OptimError("the state's layout names an unknown optimizer or parameter")
            new_state[which].setdefault(i, {})[name] = tensor
        for entry in scalars:
            which, i, name, value = entry
            if which not in opts or not isinstance(i, int) or not 0 <= i < n or not isinstance(name, str):
                raise OptimError("the state's scalars name an unknown optimizer or parameter")
            new_state[which].setdefault(i, {})[name] = value
        lrs = metadata.get("lrs")
        if not isinstance(lrs, list) or len(lrs) != len(self.opt.param_groups):
            raise OptimError("the state's learning rates do not match our parameter groups")
        with torch.no_grad():
            for p, t in zip(self.params, tensors[:n], strict=True):
                p.copy_(t)
            for which, opt in opts.items():
                opt.state.clear()
                for i, values in new_state[which].items():
                    p = self.params[i]
                    opt.state[p] = {
                        k: v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                        for k, v in values.items()
                    }
            for group, lr in zip(self.opt.param_groups, lrs, strict=True):
                group["lr"] = float(lr)
            sched = metadata.get("scheduler")
            if self.scheduler is not None and isinstance(sched, list) and len(sched) == 2:
                state = self.scheduler.state_dict()
                state.update({"last_epoch": int(sched[0]), "_step_count": int(sched[1]), "_last_lr": list(lrs)})
                self.scheduler.load_state_dict(state)
            for acc in self._accumulators:
                acc.zero_()
            if self._anchor:
                for a, p in zip(self._anchor, self.params, strict=True):
                    a.copy_(p.detach())
        self.epoch = epoch
        self.stats.epoch = epoch
        self._local_samples = 0
