"""Immutable status snapshots: what the client is doing, as the dashboard, headless logs and ``volunteer status`` see it.

A :class:`StatusSnapshot` is a tree of frozen dataclasses. It is built by the runtime on demand, rendered
by the faces and sent over the control endpoint as JSON (``to_dict()``; plain ``str``/``int``/``float``/
``bool``/``None``/``list``/``dict`` values, so msgpack works too). :meth:`StatusSnapshot.from_dict` checks
every field's type and range, because a snapshot read back from a socket is input like any other.

Roles write into a :class:`RoleReport` (the mutable side); the runtime turns it into a snapshot.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from volunteer.errors import StatusFormatError

State = Literal["starting", "idle", "training", "serving", "paused", "stopping"]
"""What the client is doing: the first word of the dashboard's state line."""

STATES: tuple[str, ...] = get_args(State)

MAX_LOSS_POINTS = 512
"""Loss history kept in a snapshot (older points are dropped)."""
MAX_LOG_LINES = 200
"""Recent log lines kept in a snapshot."""
MAX_TEXT = 2000
"""Longest string accepted in a snapshot field (log messages are cut to this)."""
MAX_GPUS = 64


@dataclass(frozen=True, slots=True)
class LossPoint:
    """One point of the training-loss curve."""

    step: int
    """Optimizer step (global, as the collaborative optimizer counts it)."""
    loss: float
    """Mean training loss at that step."""


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log record as the faces show it."""

    time: float
    """Unix time of the record."""
    level: str
    """Level name: DEBUG, INFO, WARNING, ERROR, CRITICAL."""
    message: str
    """The formatted message, at most :data:`MAX_TEXT` characters."""


@dataclass(frozen=True, slots=True)
class GpuUse:
    """One GPU's latest readings against its caps; ``None`` where the value cannot be read (no NVML)."""

    name: str
    """Device name as torch reports it."""
    utilization_percent: float | None = None
    """Busy fraction of the device, 0-100."""
    memory_used_bytes: int | None = None
    """Device memory in use (all processes)."""
    memory_total_bytes: int | None = None
    """Device memory size."""
    temperature_c: float | None = None
    """Core temperature."""
    temperature_cap_c: float | None = None
    """The preference's temperature cap, if any."""
    power_w: float | None = None
    """Current board power draw."""
    power_cap_w: float | None = None
    """The preference's power cap, if any."""


@dataclass(frozen=True, slots=True)
class HostUse:
    """The machine's latest readings and the throttle decision, side by side so a face can draw bars against caps.

    CPU percentages are of the whole machine (100 = every logical core busy).
    """

    profile: str
    """Which preference profile applies now: ``"active"`` (owner at the keyboard) or ``"idle"``."""
    run: bool
    """Whether the throttle lets work run now."""
    reason: str
    """Why it runs or pauses (the throttle decision's reason)."""
    duty_cycle: float
    """Fraction of wall time the work may be busy, 0-1."""
    threads: int
    """Compute threads the work may use."""
    use_gpu: bool
    """Whether the work may use the GPU now."""
    cpu_percent_total: float
    """CPU use of the whole machine."""
    cpu_percent_ours: float
    """CPU use of this client."""
    cpu_cap_percent: float
    """The most CPU this client may use (duty cycle x threads / cores)."""
    memory_used_bytes: int
    """Memory used by this client."""
    memory_total_bytes: int
    """Physical memory of the machine."""
    memory_budget_bytes: int | None
    """The memory cap for this client now, if any."""
    upload_bps: float = 0.0
    """Measured upload rate, bytes per second."""
    download_bps: float = 0.0
    """Measured download rate, bytes per second."""
    upload_cap_bps: float | None = None
    """Upload cap, bytes per second (``None``: uncapped)."""
    download_cap_bps: float | None = None
    """Download cap, bytes per second (``None``: uncapped)."""
    user_idle_s: float | None = None
    """Seconds since the owner last touched keyboard or mouse (``None``: cannot be read here)."""
    on_battery: bool = False
    """Whether the machine runs on battery."""
    gpus: tuple[GpuUse, ...] = ()
    """One entry per GPU."""


@dataclass(frozen=True, slots=True)
class Contribution:
    """What this machine has given so far in this session."""

    samples: int = 0
    """Training samples processed (or expert requests served)."""
    compute_seconds: float = 0.0
    """Seconds of work done inside the work gate."""
    bytes_sent: int = 0
    """Bytes uploaded to peers."""
    bytes_received: int = 0
    """Bytes downloaded from peers."""


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Everything a face shows about the running client, at one instant."""

    version: str
    """The client's version."""
    peer_id: str
    """This installation's peer id (text form)."""
    time: float
    """Unix time the snapshot was taken."""
    uptime_s: float
    """Seconds since the client started."""
    state: State
    """What the client does now."""
    reason: str
    """Why (for example ``"no run joined"``, ``"paused from the dashboard"``, ``"on battery"``)."""
    machine: str = ""
    """A one-line summary of the hardware profile."""
    run: str | None = None
    """The run joined, or ``None``."""
    role: str = "none"
    """The role(s) taken in the run (``"trainer"``, ``"expert server"``, ``"trainer+expert server"``)."""
    throughput: float = 0.0
    """Samples per second over the last minute."""
    loss: tuple[LossPoint, ...] = ()
    """Recent training loss, oldest first."""
    peers: int = 0
    """Peers currently known in the run."""
    host: HostUse | None = None
    """Readings and throttle decision; ``None`` before the first sample."""
    contribution: Contribution = field(default_factory=Contribution)
    """What has been given so far."""
    logs: tuple[LogLine, ...] = ()
    """Recent log lines, oldest first."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and msgpack-ready dictionary (tuples become lists)."""
        return cast(dict[str, Any], _plain(self))

    @classmethod
    def from_dict(cls, data: object) -> StatusSnapshot:
        """Parse and validate a dictionary made by :meth:`to_dict`; :class:`StatusFormatError` if it does not fit."""
        d = _mapping(data, "snapshot")
        state = _text(d, "state")
        if state not in STATES:
            raise StatusFormatError(f"snapshot field 'state' must be one of {', '.join(STATES)}, got {state!r:.40}")
        host_raw = d.get("host")
        return cls(
            version=_text(d, "version"),
            peer_id=_text(d, "peer_id"),
            time=_number(d, "time"),
            uptime_s=_number(d, "uptime_s", minimum=0.0),
            state=cast(State, state),
            reason=_text(d, "reason"),
            machine=_text(d, "machine", default=""),
            run=_optional_text(d, "run"),
            role=_text(d, "role", default="none"),
            throughput=_number(d, "throughput", minimum=0.0, default=0.0),
            loss=tuple(_loss_point(x) for x in _list(d, "loss", MAX_LOSS_POINTS)),
            peers=_integer(d, "peers", default=0),
            host=None if host_raw is None else _host(host_raw),
            contribution=_contribution(d.get("contribution", {})),
            logs=tuple(_log_line(x) for x in _list(d, "logs", MAX_LOG_LINES)),
        )


class RoleReport:
    """The mutable side of the status: roles record progress here; the runtime snapshots it.

    Single event loop, so no locks. Only the runtime and its roles hold a reference.
    """

    def __init__(self) -> None:
        self.run: str | None = None
        """The run joined, or ``None``."""
        self.role: str = "none"
        """The role name(s) shown to the user."""
        self.state: State | None = None
        """``"training"`` or ``"serving"`` while a role works; ``None`` when no role is active."""
        self.reason: str = ""
        """Optional detail for :attr:`state`."""
        self.throughput: float = 0.0
        """Samples per second, as the role measures it."""
        self.peers: int = 0
        """Peers currently known in the run."""
        self.loss: deque[LossPoint] = deque(maxlen=MAX_LOSS_POINTS)
        self._samples = 0
        self._compute_seconds = 0.0
        self._bytes_sent = 0
        self._bytes_received = 0

    def add_loss(self, step: int, loss: float) -> None:
        """Record the loss at an optimizer step (non-finite values are skipped: they cannot be plotted)."""
        if math.isfinite(loss):
            self.loss.append(LossPoint(int(step), float(loss)))

    def add_work(self, *, samples: int = 0, seconds: float = 0.0, sent: int = 0, received: int = 0) -> None:
        """Add to the contribution counters."""
        if samples < 0 or seconds < 0 or sent < 0 or received < 0:
            raise ValueError("contribution counters only grow")
        self._samples += samples
        self._compute_seconds += seconds
        self._bytes_sent += sent
        self._bytes_received += received

    @property
    def contribution(self) -> Contribution:
        """The counters so far."""
        return Contribution(self._samples, self._compute_seconds, self._bytes_sent, self._bytes_received)


# --- serialization helpers ------------------------------------------------------------------------


def _plain(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _mapping(data: object, what: str) -> Mapping[str, object]:
    if not isinstance(data, Mapping):
        raise StatusFormatError(f"{what} must be an object, got {type(data).__name__}")
    return cast(Mapping[str, object], data)


_MISSING: Any = object()


def _field(d: Mapping[str, object], key: str, default: object) -> object:
    if key in d:
        return d[key]
    if default is _MISSING:
        raise StatusFormatError(f"snapshot field {key!r} is missing")
    return default


def _text(d: Mapping[str, object], key: str, default: str = _MISSING) -> str:
    value = _field(d, key, default)
    if not isinstance(value, str):
        raise StatusFormatError(f"snapshot field {key!r} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise StatusFormatError(f"snapshot field {key!r} is longer than {MAX_TEXT} characters")
    return value


def _optional_text(d: Mapping[str, object], key: str) -> str | None:
    return None if d.get(key) is None else _text(d, key)


def _number(d: Mapping[str, object], key: str, *, minimum: float | None = None, default: float = _MISSING) -> float:
    value = _field(d, key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StatusFormatError(f"snapshot field {key!r} must be a finite number, got {value!r:.40}")
    if minimum is not None and value < minimum:
        raise StatusFormatError(f"snapshot field {key!r} must be >= {minimum}, got {value!r}")
    return float(value)


def _optional_number(d: Mapping[str, object], key: str) -> float | None:
    return None if d.get(key) is None else _number(d, key)


def _integer(d: Mapping[str, object], key: str, default: int = _MISSING) -> int:
    value = _field(d, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StatusFormatError(f"snapshot field {key!r} must be a non-negative integer, got {value!r:.40}")
    return value


def _optional_integer(d: Mapping[str, object], key: str) -> int | None:
    return None if d.get(key) is None else _integer(d, key)


def _boolean(d: Mapping[str, object], key: str, default: bool = _MISSING) -> bool:
    value = _field(d, key, default)
    if not isinstance(value, bool):
        raise StatusFormatError(f"snapshot field {key!r} must be true or false, got {value!r:.40}")
    return value


def _list(d: Mapping[str, object], key: str, limit: int) -> list[object]:
    value = _field(d, key, [])
    if not isinstance(value, list | tuple):
        raise StatusFormatError(f"snapshot field {key!r} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise StatusFormatError(f"snapshot field {key!r} has {len(value)} entries, at most {limit} allowed")
    return list(value)


def _loss_point(raw: object) -> LossPoint:
    d = _mapping(raw, "loss point")
    return LossPoint(step=_integer(d, "step"), loss=_number(d, "loss"))


def _log_line(raw: object) -> LogLine:
    d = _mapping(raw, "log line")
    return LogLine(time=_number(d, "time"), level=_text(d, "level"), message=_text(d, "message"))


def _gpu(raw: object) -> GpuUse:
    d = _mapping(raw, "gpu")
    return GpuUse(
        name=_text(d, "name"),
        utilization_percent=_optional_number(d, "utilization_percent"),
        memory_used_bytes=_optional_integer(d, "memory_used_bytes"),
        memory_total_bytes=_optional_integer(d, "memory_total_bytes"),
        temperature_c=_optional_number(d, "temperature_c"),
        temperature_cap_c=_optional_number(d, "temperature_cap_c"),
        power_w=_optional_number(d, "power_w"),
        power_cap_w=_optional_number(d, "power_cap_w"),
    )


def _host(raw: object) -> HostUse:
    d = _mapping(raw, "host")
    duty = _number(d, "duty_cycle", minimum=0.0)
    if duty > 1.0:
        raise StatusFormatError(f"snapshot field 'duty_cycle' must be between 0 and 1, got {duty}")
    return HostUse(
        profile=_text(d, "profile"),
        run=_boolean(d, "run"),
        reason=_text(d, "reason"),
        duty_cycle=duty,
        threads=_integer(d, "threads"),
        use_gpu=_boolean(d, "use_gpu"),
        cpu_percent_total=_number(d, "cpu_percent_total", minimum=0.0),
        cpu_percent_ours=_number(d, "cpu_percent_ours", minimum=0.0),
        cpu_cap_percent=_number(d, "cpu_cap_percent", minimum=0.0),
        memory_used_bytes=_integer(d, "memory_used_bytes"),
        memory_total_bytes=_integer(d, "memory_total_bytes"),
        memory_budget_bytes=_optional_integer(d, "memory_budget_bytes"),
        upload_bps=_number(d, "upload_bps", minimum=0.0, default=0.0),
        download_bps=_number(d, "download_bps", minimum=0.0, default=0.0),
        upload_cap_bps=_optional_number(d, "upload_cap_bps"),
        download_cap_bps=_optional_number(d, "download_cap_bps"),
        user_idle_s=_optional_number(d, "user_idle_s"),
        on_battery=_boolean(d, "on_battery", default=False),
        gpus=tuple(_gpu(x) for x in _list(d, "gpus", MAX_GPUS)),
    )


def _contribution(raw: object) -> Contribution:
    d = _mapping(raw, "contribution")
    return Contribution(
        samples=_integer(d, "samples", default=0),
        compute_seconds=_number(d, "compute_seconds", minimum=0.0, default=0.0),
        bytes_sent=_integer(d, "bytes_sent", default=0),
        bytes_received=_integer(d, "bytes_received", default=0),
    )
