"""Run manifests: what a run trains and how, signed by its owner and found in the DHT by the run's name.

A run is a name plus a :class:`Manifest`: the owner's Ed25519 public key, the protocol version, a model
template and its config, a data source, optimizer and averaging settings, and (later) an expert layout.

Forms
-----
- **TOML** (:func:`manifest_to_toml`, :func:`manifest_from_toml`): the editable file ``volunteer run create``
  writes, with a comment on every setting. Numbers may be written loosely there (``lr = 1`` is a float).
- **Canonical msgpack** (:meth:`Manifest.to_bytes`): maps with sorted keys, every config resolved with its
  defaults, floats as float64. One manifest has exactly one canonical form, so the owner's signature covers
  the meaning, not a particular spelling; :meth:`SignedManifest.from_wire` re-encodes what it parsed and
  refuses anything that is not byte-for-byte canonical.
- **Signed** (:class:`SignedManifest`): the canonical bytes plus the owner's signature over
  ``b"volunteer/manifest/v1\\0" + bytes``. Verification recomputes everything; nothing is trusted.

In the DHT
----------
The signed manifest is stored under :func:`manifest_key` ``(run name)`` as a *dictionary* value whose subkey
is the owner's ``[owner:<public key>]`` marker (:func:`~coordinator_free_dht.validation.owner_marker`), so
the DHT's :class:`~coordinator_free_dht.validation.OwnerValidator` lets only the owner write it, and several
owners may claim the same name without overwriting each other. :func:`select_manifest` then picks the one
the user asked for.

Run references and fingerprints
-------------------------------
``NAME@FINGERPRINT`` pins the owner; a bare ``NAME`` accepts the only valid manifest published under that
name (and tells the user its fingerprint). The fingerprint of an owner is the first
:data:`FINGERPRINT_CHARS` (16) characters of the text form of its :class:`~coordinator_free_dht.identity.PeerID`
(80 bits of SHA-256 over the public key: a forger would need a second preimage); the full 52-character
PeerID is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import msgpack
import tomlkit
import tomlkit.items

from coordinator_free_dht.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerID, verify
from coordinator_free_dht.validation import KeySchema, Scalar, Struct, owner_marker
from volunteer.errors import ManifestError
from volunteer.run.templates import (
    CODEC_NAMES,
    Config,
    ConfigValue,
    Param,
    ParamTable,
    Task,
    check_data_fits_model,
    data_generator,
    model_template,
    optimizer_table,
    shard_task,
)

PROTOCOL_VERSION: Final = 1
"""The manifest and training protocol this client speaks; a run with another version is refused."""

MAX_MANIFEST_BYTES: Final = 192 * 1024
"""Largest canonical manifest (fits a DHT value with room for the signature)."""

MAX_SHARDS: Final = 1024
"""Most shards a manifest may list."""

MAX_URL_CHARS: Final = 1024
"""Longest shard URL."""

MAX_DESCRIPTION_CHARS: Final = 2000
"""Longest run description."""

FINGERPRINT_CHARS: Final = 16
"""Length of an owner fingerprint: the first characters of the owner's PeerID text (80 bits)."""

MANIFEST_KEY_PREFIX: Final = "volunteer/manifest/"
"""Every run's manifest lives under this prefix plus the run name."""

SHARD_FORMAT: Final = "vshard-1"
"""The only shard format (see :mod:`volunteer.run.data`)."""

_SIGNING_DOMAIN: Final = b"volunteer/manifest/v1\x00"
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_FINGERPRINT_RE: Final = re.compile(r"[a-z2-7]+")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_URL_RE: Final = re.compile(r"https?://[^\s/?#]+[^\s]*")


def check_run_name(name: object, path: str = "name") -> str:
    """Return ``name`` if it is a valid run name: 1-64 of ``a-z 0-9 . _ -``, starting with a letter or digit."""
    if type(name) is not str or not _NAME_RE.fullmatch(name):
        raise ManifestError(
            f"{path}: {name!r:.80} is not a valid run name: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def fingerprint(public_key: bytes) -> str:
    """The owner fingerprint of a raw Ed25519 public key (see the module docs)."""
    return str(PeerID.from_public_key(public_key))[:FINGERPRINT_CHARS]


def _owner_text(public_key: bytes) -> str:
    return base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def _owner_from_text(text: object, path: str) -> bytes:
    if type(text) is not str or len(text) != 52:
        raise ManifestError(f"{path}: expected the owner's public key as 52 base32 characters, got {text!r:.80}")
    try:
        raw = base64.b32decode(text.upper() + "====")
    except (binascii.Error, ValueError) as exc:
        raise ManifestError(f"{path}: not base32: {text!r:.80}") from exc
    return raw


# --- the parts of a manifest ------------------------------------------------------------------------------


def _check_scalars(obj: object, table: ParamTable, path: str) -> None:
    for key, param in table.params.items():
        param.check(getattr(obj, key), f"{path}.{key}")
    if table.check is not None:
        problem = table.check({key: getattr(obj, key) for key in table.params})
        if problem:
            raise ManifestError(f"{path}: {problem}")


def _scalars(obj: object, table: ParamTable) -> dict[str, ConfigValue]:
    return {key: getattr(obj, key) for key in sorted(table.params)}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which built-in model template to build, and its config (resolved: every key present)."""

    template: str
    """A name from :data:`volunteer.run.templates.MODEL_TEMPLATES`, e.g. ``"mlp"``."""
    config: Config = field(default_factory=dict)
    """The template's settings; missing keys get their defaults, unknown keys are refused."""

    def __post_init__(self) -> None:
        table = model_template(self.template)
        object.__setattr__(self, "config", table.resolve(self.config, "model.config"))

    @property
    def table(self) -> ParamTable:
        """The template's parameter table."""
        return model_template(self.template)


@dataclass(frozen=True, slots=True)
class BuiltinData:
    """Generated data that needs nothing from outside (see :data:`volunteer.run.templates.DATA_GENERATORS`)."""

    generator: str
    """The generator's name, e.g. ``"teacher"`` or ``"tokens"``."""
    config: Config = field(default_factory=dict)
    """The generator's settings (resolved)."""

    kind: Literal["builtin"] = field(default="builtin", init=False)
    """Discriminator in the manifest's ``data`` table."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", data_generator(self.generator).resolve(self.config, "data.config"))

    @property
    def task(self) -> Task:
        """The task this generator produces data for."""
        task = data_generator(self.generator).task
        assert task is not None
        return task


@dataclass(frozen=True, slots=True)
class Shard:
    """One file of a sharded dataset: where it is, how big, and its SHA-256 (checked before any use)."""

    url: str
    """``http://`` or ``https://`` URL."""
    size: int
    """Exact size in bytes."""
    sha256: str
    """Lowercase hex SHA-256 of the whole file."""

    def __post_init__(self) -> None:
        if type(self.url) is not str or len(self.url) > MAX_URL_CHARS or not _URL_RE.fullmatch(self.url):
            raise ManifestError(
                f"data.shards: {self.url!r:.80} is not an http(s) URL of at most {MAX_URL_CHARS} characters"
            )
        if type(self.size) is not int or not 1 <= self.size <= 1 << 40:
            raise ManifestError(f"data.shards: size {self.size!r:.40} of {self.url} must be 1 byte to 1 TiB")
        if type(self.sha256) is not str or not _SHA256_RE.fullmatch(self.sha256):
            raise ManifestError(f"data.shards: sha256 of {self.url} must be 64 lowercase hex digits")


@dataclass(frozen=True, slots=True)
class ShardedData:
    """A dataset of shards downloaded over HTTP(S); every peer reads them in its own random order."""

    task: str
    """What the shards hold: ``"classification"`` or ``"language-model"``."""
    config: Config
    """The task's dimensions (see :data:`volunteer.run.templates.SHARD_TASKS`)."""
    shards: tuple[Shard, ...]
    """The shards (at least one, at most :data:`MAX_SHARDS`, distinct checksums)."""
    format: str = SHARD_FORMAT
    """Shard file format; only ``"vshard-1"`` exists."""

    kind: Literal["shards"] = field(default="shards", init=False)
    """Discriminator in the manifest's ``data`` table."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", shard_task(self.task).resolve(self.config, "data.config"))
        if self.format != SHARD_FORMAT:
            raise ManifestError(f"data.format: {self.format!r:.40} is unknown; the only shard format is {SHARD_FORMAT}")
        shards = tuple(self.shards)
        if not 1 <= len(shards) <= MAX_SHARDS:
            raise ManifestError(f"data.shards: list 1 to {MAX_SHARDS} shards, got {len(shards)}")
        if not all(isinstance(shard, Shard) for shard in shards):
            raise ManifestError("data.shards: every entry must be a Shard")
        if len({shard.sha256 for shard in shards}) != len(shards):
            raise ManifestError("data.shards: two shards have the same sha256 (listed twice?)")
        object.__setattr__(self, "shards", shards)

    @property
    def total_bytes(self) -> int:
        """The size of the whole dataset."""
        return sum(shard.size for shard in self.shards)


DataSpec = BuiltinData | ShardedData
"""Where training data comes from."""


SCHEDULE_PARAMS: Final = ParamTable(
    name="schedule",
    description="How the learning rate changes with the collaborative epoch (one epoch = one global step).",
    params={
        "kind": Param(
            str,
            "constant",
            "after warm-up: constant, or a linear or cosine decay",
            choices=("constant", "linear", "cosine"),
        ),
        "warmup_epochs": Param(int, 0, "epochs of linear warm-up from 0", 0, 10**9),
        "total_epochs": Param(int, 10000, "epoch at which a decay reaches its end", 1, 10**9),
        "min_lr_ratio": Param(float, 0.0, "learning rate at the end of a decay, relative to lr", 0.0, 1.0),
    },
    check=lambda c: "warmup_epochs must not exceed total_epochs" if c["warmup_epochs"] > c["total_epochs"] else None,  # type: ignore[operator]
)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A learning-rate schedule over collaborative epochs (pure: :meth:`factor` is all it does)."""

    kind: str = "constant"
    """``constant``, ``linear`` or ``cosine``."""
    warmup_epochs: int = 0
    """Epochs of linear warm-up from 0 to the full learning rate."""
    total_epochs: int = 10000
    """Where a decay ends (and stays at ``min_lr_ratio``)."""
    min_lr_ratio: float = 0.0
    """The decayed learning rate relative to the base one."""

    def __post_init__(self) -> None:
        _check_scalars(self, SCHEDULE_PARAMS, "optimizer.schedule")

    def factor(self, epoch: int) -> float:
        """The multiplier of the base learning rate at collaborative ``epoch`` (0-based)."""
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """The inner optimizer: a name from the allow-list, its hyperparameters and a schedule."""

    name: str = "adam"
    """``sgd``, ``adam``, ``adamw`` or ``lamb`` (:data:`volunteer.run.templates.OPTIMIZERS`)."""
    params: Config = field(default_factory=dict)
    """Hyperparameters (resolved with defaults)."""
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    """Learning-rate schedule."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", optimizer_table(self.name).resolve(self.params, "optimizer.params"))
        if not isinstance(self.schedule, ScheduleSpec):
            raise ManifestError("optimizer.schedule must be a ScheduleSpec")


COMPRESSION_PARAMS: Final = ParamTable(
    name="compression",
    description="Compression of what peers send each other, per role of the tensor.",
    params={
        "gradients": Param(str, "adaptive", "averaged gradients (grad mode)", choices=CODEC_NAMES),
        "parameters": Param(str, "adaptive", "parameter changes (local mode) and parameters", choices=CODEC_NAMES),
        "state": Param(str, "adaptive", "state downloaded by joining peers", choices=CODEC_NAMES),
    },
)


@dataclass(frozen=True, slots=True)
class CompressionSpec:
    """Compression per role: ``adaptive`` (by size and role) or one fixed codec name."""

    gradients: str = "adaptive"
    """Gradients averaged in ``grad`` mode."""
    parameters: str = "adaptive"
    """Parameter deltas averaged in ``local`` mode."""
    state: str = "adaptive"
    """Model and optimizer state sent to peers that join late."""

    def __post_init__(self) -> None:
        _check_scalars(self, COMPRESSION_PARAMS, "averaging.compression")


def _check_averaging(c: Config) -> str | None:
    if c["min_group_size"] > c["max_group_size"]:  # type: ignore[operator]
        return "min_group_size must not exceed max_group_size"
    if c["batch_size"] > c["target_batch_size"]:  # type: ignore[operator]
        return "batch_size (per local step) must not exceed target_batch_size (per epoch, whole swarm)"
    return None


AVERAGING_PARAMS: Final = ParamTable(
    name="averaging",
    description="How peers train together.",
    params={
        "mode": Param(
            str,
            "grad",
            "grad: average gradients, all step together; local: DiLoCo outer steps",
            choices=("grad", "local"),
        ),
        "target_batch_size": Param(int, 4096, "samples the whole swarm processes per epoch (global step)", 1, 1 << 40),
        "batch_size": Param(int, 32, "samples per local step on each peer", 1, 1 << 20),
        "min_group_size": Param(int, 2, "smallest averaging group worth forming", 1, 4096),
        "max_group_size": Param(int, 16, "largest averaging group (bigger swarms average in several groups)", 1, 4096),
        "matchmaking_time": Param(
            float, 5.0, "seconds to gather an averaging group", 0.0, 600.0, exclusive_minimum=True
        ),
        "allreduce_timeout": Param(float, 60.0, "seconds an all-reduce may take", 0.0, 3600.0, exclusive_minimum=True),
        "state_sync_timeout": Param(
            float, 120.0, "seconds to download state from peers", 0.0, 3600.0, exclusive_minimum=True
        ),
        "outer_lr": Param(float, 0.7, "local mode: outer (Nesterov) learning rate", 0.0, 10.0, exclusive_minimum=True),
        "outer_momentum": Param(float, 0.9, "local mode: outer Nesterov momentum", 0.0, 0.999999),
    },
    check=_check_averaging,
)


@dataclass(frozen=True, slots=True)
class AveragingSpec:
    """Collaborative training settings: the mode, the global batch, groups, timeouts and compression."""

    mode: str = "grad"
    """``grad``: gradient averaging at every epoch; ``local``: local updates with an outer step (DiLoCo,
    arXiv 2311.08105)."""
    target_batch_size: int = 4096
    """Samples the whole swarm accumulates per epoch (one global optimizer step)."""
    batch_size: int = 32
    """Samples per local step on each peer."""
    min_group_size: int = 2
    """Smallest averaging group worth forming."""
    max_group_size: int = 16
    """Largest averaging group."""
    matchmaking_time: float = 5.0
    """Seconds to gather a group."""
    allreduce_timeout: float = 60.0
    """Seconds one all-reduce may take."""
    state_sync_timeout: float = 120.0
    """Seconds to download state from peers."""
    outer_lr: float = 0.7
    """Local mode: outer learning rate."""
    outer_momentum: float = 0.9
    """Local mode: outer Nesterov momentum."""
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    """Compression per tensor role."""

    def __post_init__(self) -> None:
        _check_scalars(self, AVERAGING_PARAMS, "averaging")
        if not isinstance(self.compression, CompressionSpec):
            raise ManifestError("averaging.compression must be a CompressionSpec")


EXPERT_PARAMS: Final = ParamTable(
    name="experts",
    description="Mixture-of-experts layout (reserved: validated, not used yet).",
    params={
        "expert_template": Param(str, "ffn", "what each expert is", choices=("ffn",)),
        "hidden_dim": Param(int, 1024, "hidden width of each expert", 1, 65536),
        "k_best": Param(int, 4, "experts each token is sent to", 1, 256),
        "k_min": Param(int, 1, "fewest expert answers a forward pass accepts", 0, 256),
        "forward_timeout": Param(float, 5.0, "seconds to wait for expert outputs", 0.0, 600.0, exclusive_minimum=True),
        "backward_timeout": Param(
            float, 10.0, "seconds to wait for expert gradients", 0.0, 600.0, exclusive_minimum=True
        ),
    },
    check=lambda c: "k_min must not exceed k_best" if c["k_min"] > c["k_best"] else None,  # type: ignore[operator]
)


@dataclass(frozen=True, slots=True)
class ExpertsSpec:
    """Room for a mixture-of-experts layout: validated today, used by a later version."""

    grid: tuple[int, ...]
    """Size of each dimension of the expert grid (1-4 dimensions, each 1-4096)."""
    expert_template: str = "ffn"
    """What each expert is."""
    hidden_dim: int = 1024
    """Hidden width of each expert."""
    k_best: int = 4
    """Experts each token is routed to."""
    k_min: int = 1
    """Fewest expert answers a forward pass accepts."""
    forward_timeout: float = 5.0
    """Seconds to wait for expert outputs."""
    backward_timeout: float = 10.0
    """Seconds to wait for expert gradients."""

    def __post_init__(self) -> None:
        grid = self.grid
        if type(grid) not in (tuple, list) or not 1 <= len(grid) <= 4:
            raise ManifestError("experts.grid: list 1 to 4 dimensions, e.g. grid = [16, 16]")
        for size in grid:
            if type(size) is not int or not 1 <= size <= 4096:
                raise ManifestError(f"experts.grid: every dimension is an integer from 1 to 4096, got {size!r:.40}")
        object.__setattr__(self, "grid", tuple(grid))
        _check_scalars(self, EXPERT_PARAMS, "experts")


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a peer needs to take part in a run, signed as a whole by the owner.

    Construction validates every field; a model and data that do not fit together are refused.
    """

    name: str
    """The run's name (1-64 of ``a-z 0-9 . _ -``)."""
    owner: bytes
    """The owner's raw 32-byte Ed25519 public key; only its holder can sign and publish the manifest."""
    model: ModelSpec
    """Model template and config."""
    data: DataSpec
    """Where the training data comes from."""
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    """Inner optimizer."""
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    """How peers train together."""
    experts: ExpertsSpec | None = None
    """Reserved for a mixture-of-experts layout."""
    seed: int = 0
    """Seeds the initial model and the built-in data; peers add their own seed for their data streams."""
    description: str = ""
    """Free text for people deciding whether to join."""
    protocol_version: int = PROTOCOL_VERSION
    """Must equal :data:`PROTOCOL_VERSION`."""

    def __post_init__(self) -> None:
        check_run_name(self.name)
        if type(self.owner) is not bytes or len(self.owner) != PUBLIC_KEY_BYTES:
            raise ManifestError(f"owner: expected a {PUBLIC_KEY_BYTES}-byte Ed25519 public key")
        check_protocol_version(self.protocol_version)
        if type(self.seed) is not int or not 0 <= self.seed < 1 << 63:
            raise ManifestError(f"seed: expected an integer from 0 to 2**63-1, got {self.seed!r:.40}")
        if type(self.description) is not str or len(self.description) > MAX_DESCRIPTION_CHARS:
            raise ManifestError(f"description: expected text of at most {MAX_DESCRIPTION_CHARS} characters")
        for name, kind in (
            ("model", ModelSpec),
            ("data", (BuiltinData, ShardedData)),
            ("optimizer", OptimizerSpec),
            ("averaging", AveragingSpec),
            ("experts", (ExpertsSpec, type(None))),
        ):
            if not isinstance(getattr(self, name), kind):
                raise ManifestError(f"{name}: wrong type {type(getattr(self, name)).__name__}")
        task = self.data.task if isinstance(self.data, BuiltinData) else Task(self.data.task)
        check_data_fits_model(task, self.data.config, self.model.table, self.model.config)

    @property
    def fingerprint(self) -> str:
        """The owner's fingerprint (see the module docs)."""
        return fingerprint(self.owner)

    @property
    def reference(self) -> str:
        """``NAME@FINGERPRINT``: what to type to join exactly this owner's run."""
        return f"{self.name}@{self.fingerprint}"

    def with_owner(self, owner: bytes) -> Manifest:
        """A copy owned by ``owner`` (a raw public key)."""
        return replace(self, owner=owner)

    def to_dict(self) -> dict[str, Any]:
        """The canonical structure (maps with sorted keys; ``owner`` as bytes)."""
        return manifest_to_dict(self)

    def to_bytes(self) -> bytes:
        """The canonical msgpack encoding (what the owner signs)."""
        data: bytes = msgpack.packb(_sorted(self.to_dict()), use_bin_type=True)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"the manifest encodes to {len(data)} bytes, over the limit of {MAX_MANIFEST_BYTES}; list fewer shards"
            )
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse canonical bytes strictly (exact types, no unknown fields, canonical encoding)."""
        obj = _unpack(data)
        if type(obj) is not dict:
            raise ManifestError("a manifest is a map")
        check_protocol_version(obj.get("protocol_version"))
        manifest = manifest_from_dict(obj, lenient=False)
        if manifest.to_bytes() != data:
            raise ManifestError("the manifest is not in canonical form (reordered, missing or extra fields)")
        return manifest


def check_protocol_version(version: object) -> None:
    """Raise :class:`ManifestError` with advice unless ``version`` is :data:`PROTOCOL_VERSION`."""
    if type(version) is not int:
        raise ManifestError(f"protocol_version: expected an integer, got {version!r:.40}")
    if version > PROTOCOL_VERSION:
        raise ManifestError(
            f"this run needs protocol version {version}, but this client speaks version {PROTOCOL_VERSION}: "
            "upgrade volunteer (pipx upgrade volunteer) to join it"
        )
    if version < PROTOCOL_VERSION:
        raise ManifestError(
            f"this run uses the old protocol version {version}; this client speaks version {PROTOCOL_VERSION}: "
            "ask the run's owner to republish it with a current volunteer"
        )


# --- dict form (shared by msgpack and TOML) ---------------------------------------------------------------


def _sorted(obj: object) -> object:
    if isinstance(obj, Mapping):
        return {key: _sorted(obj[key]) for key in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(item) for item in obj]
    return obj


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    """The manifest as plain maps and lists (``owner`` as raw bytes), every config resolved."""
    data: dict[str, Any]
    if isinstance(m.data, BuiltinData):
        data = {"kind": "builtin", "generator": m.data.generator, "config": dict(m.data.config)}
    else:
        data = {
            "kind": "shards",
            "format": m.data.format,
            "task": m.data.task,
            "config": dict(m.data.config),
            "shards": [{"url": s.url, "size": s.size, "sha256": s.sha256} for s in m.data.shards],
        }
    averaging: dict[str, Any] = dict(_scalars(m.averaging, AVERAGING_PARAMS))
    averaging["compression"] = _scalars(m.averaging.compression, COMPRESSION_PARAMS)
    out: dict[str, Any] = {
        "protocol_version": m.protocol_version,
        "name": m.name,
        "owner": m.owner,
        "seed": m.seed,
        "description": m.description,
        "model": {"template": m.model.template, "config": dict(m.model.config)},
        "data": data,
        "optimizer": {
            "name": m.optimizer.name,
            "params": dict(m.optimizer.params),
            "schedule": _scalars(m.optimizer.schedule, SCHEDULE_PARAMS),
        },
        "averaging": averaging,
    }
    if m.experts is not None:
        experts: dict[str, Any] = _scalars(m.experts, EXPERT_PARAMS)
        experts["grid"] = list(m.experts.grid)
        out["experts"] = experts
    return out


class _Table:
    """Reads one map of a manifest strictly: known fields only, exact types, a path in every error."""

    def __init__(self, obj: object, path: str, lenient: bool) -> None:
        if type(obj) is not dict:
            raise ManifestError(f"{path or 'manifest'}: expected a table, got {type(obj).__name__}")
        self.obj: dict[Any, Any] = obj
        self.path = path
        self.lenient = lenient
        self.seen: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: object = ..., *, required: bool = True) -> object:
        self.seen.add(key)
        if key in self.obj:
            return self.obj[key]
        if required and default is ...:
            raise ManifestError(f"{self._name(key)}: missing")
        return default

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw(key, ... if default is None else default)
        if type(value) is not str:
            raise ManifestError(f"{self._name(key)}: expected text, got {type(value).__name__}")
        return value

    def sub(self, key: str, *, optional: bool = False) -> _Table | None:
        value = self.raw(key, None if optional else ...)
        return None if value is None else _Table(value, self._name(key), self.lenient)

    def scalars(self, table: ParamTable) -> dict[str, ConfigValue]:
        """The fields of ``table`` present here, checked (absent ones get defaults from the dataclass)."""
        out: dict[str, ConfigValue] = {}
        for key, param in table.params.items():
            if key in self.obj:
                self.seen.add(key)
                out[key] = param.check(self.obj[key], self._name(key), lenient=self.lenient)
        return out

    def config(self, key: str, table: ParamTable) -> Config:
        value = self.raw(key, {} if self.lenient else ...)
        if type(value) is not dict:
            raise ManifestError(f"{self._name(key)}: expected a table, got {type(value).__name__}")
        return table.resolve(value, self._name(key), lenient=self.lenient)

    def done(self) -> None:
        unknown = sorted(str(key) for key in self.obj if key not in self.seen)
        if unknown:
            raise ManifestError(f"{self.path or 'manifest'}: unknown field(s) {', '.join(unknown)}")


def manifest_from_dict(obj: object, *, lenient: bool, owner: bytes | None = None) -> Manifest:
    """Build a manifest from :func:`manifest_to_dict`'s structure (``lenient``: the TOML spelling).

    In the lenient (TOML) form ``owner`` is the base32 text of the public key and may be absent if
    ``owner`` is passed; an owner in the file that differs from ``owner`` is refused.
    """
    top = _Table(obj, "", lenient)
    version = top.raw("protocol_version", PROTOCOL_VERSION if lenient else ...)
    check_protocol_version(version)
    assert isinstance(version, int)
    name = check_run_name(top.raw("name"))
    if lenient:
        text = top.raw("owner", None)
        file_owner = None if text is None else _owner_from_text(text, "owner")
    else:
        raw_owner = top.raw("owner")
        if type(raw_owner) is not bytes:
            raise ManifestError("owner: expected bytes")
        file_owner = raw_owner
    if file_owner is not None and owner is not None and file_owner != owner:
        raise ManifestError(
            f"the manifest names the owner {fingerprint(file_owner) if len(file_owner) == 32 else '?'}, but this "
            f"identity is {fingerprint(owner)}: sign with the owner's identity, or remove the owner line"
        )
    final_owner = file_owner if file_owner is not None else owner
    if final_owner is None:
        raise ManifestError("owner: missing (write the owner's public key, or let `volunteer host` fill it in)")
    seed = top.raw("seed", 0 if lenient else ...)
    description = top.text("description", "" if lenient else None)

    model_t = top.sub("model")
    assert model_t is not None
    template = model_t.text("template")
    model = ModelSpec(template, model_t.config("config", model_template(template, "model.template")))
    model_t.done()

    data_t = top.sub("data")
    assert data_t is not None
    kind = data_t.text("kind")
    data: DataSpec
    if kind == "builtin":
        generator = data_t.text("generator")
        data = BuiltinData(generator, data_t.config("config", data_generator(generator)))
    elif kind == "shards":
        task = data_t.text("task")
        fmt = data_t.text("format", SHARD_FORMAT if lenient else None)
        raw_shards = data_t.raw("shards")
        if type(raw_shards) is not list or len(raw_shards) > MAX_SHARDS:
            raise ManifestError(f"data.shards: expected a list of at most {MAX_SHARDS} shards")
        shards = []
        for index, item in enumerate(raw_shards):
            shard_t = _Table(item, f"data.shards[{index}]", lenient)
            shards.append(Shard(shard_t.text("url"), shard_t.raw("size"), shard_t.text("sha256")))  # type: ignore[arg-type]
            shard_t.done()
        data = ShardedData(task, data_t.config("config", shard_task(task)), tuple(shards), fmt)
    else:
        raise ManifestError(f"data.kind: {kind!r:.40} is unknown; use 'builtin' or 'shards'")
    data_t.done()

    opt_t = top.sub("optimizer", optional=lenient)
    optimizer = OptimizerSpec()
    if opt_t is not None:
        opt_name = opt_t.text("name", "adam" if lenient else None)
        sched_t = opt_t.sub("schedule", optional=lenient)
        schedule = ScheduleSpec(**sched_t.scalars(SCHEDULE_PARAMS)) if sched_t is not None else ScheduleSpec()  # type: ignore[arg-type]
        if sched_t is not None:
            sched_t.done()
        optimizer = OptimizerSpec(opt_name, opt_t.config("params", optimizer_table(opt_name)), schedule)
        opt_t.done()

    avg_t = top.sub("averaging", optional=lenient)
    averaging = AveragingSpec()
    if avg_t is not None:
        comp_t = avg_t.sub("compression", optional=lenient)
        compression = CompressionSpec(**comp_t.scalars(COMPRESSION_PARAMS)) if comp_t is not None else CompressionSpec()  # type: ignore[arg-type]
        if comp_t is not None:
            comp_t.done()
        averaging = AveragingSpec(**avg_t.scalars(AVERAGING_PARAMS), compression=compression)  # type: ignore[arg-type]
        avg_t.done()

    experts_t = top.sub("experts", optional=True)
    experts = None
    if experts_t is not None:
        grid = experts_t.raw("grid")
        if type(grid) is not list:
            raise ManifestError("experts.grid: expected a list of integers, e.g. grid = [16, 16]")
        experts = ExpertsSpec(tuple(grid), **experts_t.scalars(EXPERT_PARAMS))  # type: ignore[arg-type]
        experts_t.done()
    top.done()
    return Manifest(
        name=name,
        owner=final_owner,
        model=model,
        data=data,
        optimizer=optimizer,
        averaging=averaging,
        experts=experts,
        seed=seed,  # type: ignore[arg-type]
        description=description,
        protocol_version=version,
    )


def _unpack(data: object) -> object:
    if type(data) is not bytes:
        raise ManifestError("the manifest payload must be bytes")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the manifest is {len(data)} bytes, over the limit of {MAX_MANIFEST_BYTES}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_MANIFEST_BYTES,
            max_bin_len=MAX_MANIFEST_BYTES,
            max_array_len=MAX_SHARDS * 4,
            max_map_len=256,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ManifestError(f"the manifest is not valid msgpack: {exc}") from exc


# --- signing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A manifest with its canonical bytes and the owner's signature; build with :meth:`sign` or :meth:`from_wire`."""

    manifest: Manifest
    """The parsed manifest."""
    payload: bytes
    """Its canonical bytes, exactly as signed."""
    signature: bytes
    """The owner's Ed25519 signature over the signing domain and ``payload``."""

    @classmethod
    def sign(cls, manifest: Manifest, identity: Identity) -> SignedManifest:
        """Sign ``manifest``; ``identity`` must be its owner."""
        if identity.public_key != manifest.owner:
            raise ManifestError(
                f"the manifest's owner is {manifest.fingerprint}, but this identity is "
                f"{fingerprint(identity.public_key)}: only the owner can sign it (or set owner to your key)"
            )
        payload = manifest.to_bytes()
        return cls(manifest, payload, identity.sign(_SIGNING_DOMAIN + payload))

    def to_wire(self) -> dict[str, bytes]:
        """The value stored in the DHT: ``{"manifest": payload, "signature": signature}``."""
        return {"manifest": self.payload, "signature": self.signature}

    @classmethod
    def from_wire(cls, value: object) -> SignedManifest:
        """Check a value from the network: size limits, schema, signature, protocol version, canonical form."""
        if type(value) is not dict or set(value) != {"manifest", "signature"}:
            raise ManifestError("a signed manifest is a map with exactly 'manifest' and 'signature'")
        payload, signature = value["manifest"], value["signature"]
        if type(payload) is not bytes or type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
            raise ManifestError("a signed manifest holds the manifest bytes and a 64-byte signature")
        obj = _unpack(payload)
        owner = obj.get("owner") if type(obj) is dict else None
        if type(owner) is not bytes or len(owner) != PUBLIC_KEY_BYTES:
            raise ManifestError("the manifest does not name a valid owner key")
        if not verify(owner, signature, _SIGNING_DOMAIN + payload):
            raise ManifestError(
                f"the manifest's signature does not verify against its owner {fingerprint(owner)}: it was tampered "
                "with or corrupted; nothing was started"
            )
        return cls(Manifest.from_bytes(payload), payload, signature)


# --- run references and the DHT ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRef:
    """What the user typed: a run name, optionally pinned to an owner fingerprint (``NAME@FINGERPRINT``)."""

    name: str
    """The run's name."""
    fingerprint: str | None = None
    """16 base32 characters (or a full 52-character PeerID) of the owner; None accepts any single owner."""

    @classmethod
    def parse(cls, text: str) -> RunRef:
        """Parse ``NAME`` or ``NAME@FINGERPRINT``; a bad form raises :class:`ManifestError` saying what is expected."""
        name, sep, pin = text.strip().partition("@")
        check_run_name(name, "run")
        if not sep:
            return cls(name)
        pin = pin.lower()
        if len(pin) not in (FINGERPRINT_CHARS, 52) or not _FINGERPRINT_RE.fullmatch(pin):
            raise ManifestError(
                f"{text!r:.120}: the part after '@' must be the owner's fingerprint: {FINGERPRINT_CHARS} "
                "(or 52) base32 characters, as `volunteer host` prints it"
            )
        return cls(name, pin)

    def matches(self, owner: bytes) -> bool:
        """True if ``owner`` (a raw public key) is acceptable for this reference."""
        return self.fingerprint is None or str(PeerID.from_public_key(owner)).startswith(self.fingerprint)

    def __str__(self) -> str:
        return self.name if self.fingerprint is None else f"{self.name}@{self.fingerprint}"


def manifest_key(run_name: str) -> str:
    """The DHT key under which every claim on ``run_name`` is stored (one subkey per owner)."""
    return MANIFEST_KEY_PREFIX + check_run_name(run_name, "run")


def manifest_subkey(owner: bytes) -> str:
    """The owner-protected subkey: only the holder of ``owner`` can write it."""
    return owner_marker(owner)


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """The arguments of ``DHTNode.store(key, value, expiration_time, subkey=subkey)`` for a signed manifest."""

    key: str
    """:func:`manifest_key` of the run."""
    subkey: str
    """:func:`manifest_subkey` of the owner."""
    value: dict[str, bytes]
    """:meth:`SignedManifest.to_wire`."""


def manifest_record(signed: SignedManifest) -> ManifestRecord:
    """Where and how the owner publishes ``signed`` in the DHT (republish before it expires)."""
    return ManifestRecord(manifest_key(signed.manifest.name), manifest_subkey(signed.manifest.owner), signed.to_wire())


def manifest_key_schemas() -> dict[str, KeySchema]:
    """Schemas for a DHT :class:`~coordinator_free_dht.validation.SchemaValidator` (``prefixes=``): every node
    then refuses manifest records of the wrong shape or size before storing them."""
    value = Struct(
        {
            "manifest": Scalar(bytes, max_length=MAX_MANIFEST_BYTES),
            "signature": Scalar(bytes, max_length=SIGNATURE_BYTES),
        }
    )
    return {MANIFEST_KEY_PREFIX: KeySchema(value=value, subkey=Scalar(str, max_length=80))}


def select_manifest(ref: RunRef, entries: object) -> SignedManifest:
    """Pick the manifest ``ref`` asks for among what the DHT returned for :func:`manifest_key`.

    ``entries`` is the dictionary value ``DHTNode.get`` found (subkey -> value, each value possibly wrapped
    in a ``ValueWithExpiration``), or None. Entries that fail verification are skipped, but reported if
    nothing valid remains. A bare name with several valid owners is refused: the user must pin one.
    """
    if entries is None or not isinstance(entries, Mapping) or not entries:
        raise ManifestError(
            f"no run named {ref.name!r} was found in the DHT: check the name and the --peer address, "
            "and that its owner is hosting it"
        )
    valid: dict[bytes, SignedManifest] = {}
    problems: list[str] = []
    for subkey, entry in entries.items():
        value = getattr(entry, "value", entry)
        try:
            signed = SignedManifest.from_wire(value)
        except ManifestError as exc:
            problems.append(str(exc))
            continue
        if signed.manifest.name != ref.name:
            problems.append(f"a manifest for {signed.manifest.name!r} was stored under {ref.name!r}")
            continue
        if subkey != manifest_subkey(signed.manifest.owner):
            problems.append(f"a manifest by {signed.manifest.fingerprint} was stored under another owner's subkey")
            continue
        valid[signed.manifest.owner] = signed
    if not valid:
        detail = "; ".join(sorted(set(problems))[:3])
        raise ManifestError(f"no valid manifest for run {ref.name!r}: {detail}")
    matching = [signed for owner, signed in valid.items() if ref.matches(owner)]
    found = ", ".join(sorted(fingerprint(owner) for owner in valid))
    if not matching:
        raise ManifestError(
            f"run {ref.name!r} exists, but not from owner {ref.fingerprint} (found: {found}); check the fingerprint"
        )
    if len(matching) > 1:
        raise ManifestError(
            f"several owners publish a run named {ref.name!r} ({found}); join NAME@FINGERPRINT to choose one"
        )
    return matching[0]


# --- TOML -------------------------------------------------------------------------------------------------


def manifest_from_toml(text: str, owner: bytes | None = None) -> Manifest:
    """Parse the editable TOML form; ``owner`` fills in (and must match) the file's ``owner``."""
    try:
        obj = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.TOMLKitError as exc:
        raise ManifestError(f"the manifest file is not valid TOML: {exc}") from exc
    return manifest_from_dict(obj, lenient=True, owner=owner)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _range_note(param: Param) -> str:
    if param.choices:
        return f"one of {', '.join(param.choices)}"
    if param.kind is bool:
        return "true or false"
    low = "" if param.minimum is None else ("> " if param.exclusive_minimum else ">= ") + _number(param.minimum)
    high = "" if param.maximum is None else f"<= {_number(param.maximum)}"
    return ", ".join(part for part in (low, high) if part)


def _commented_table(values: Mapping[str, object], table: ParamTable) -> tomlkit.items.Table:
    out = tomlkit.table()
    for key, value in values.items():
        item = tomlkit.item(value)
        param = table.params.get(key)
        if param is not None:
            note = _range_note(param)
            item.comment(f"{param.doc}" + (f" ({note})" if note else ""))
        out.add(key, item)
    return out


def manifest_to_toml(m: Manifest, header: str = "") -> str:
    """The manifest as commented TOML that :func:`manifest_from_toml` reads back to an equal manifest."""
    from volunteer.run.templates import DATA_GENERATORS, MODEL_TEMPLATES, OPTIMIZERS

    d = manifest_to_dict(m)
    doc = tomlkit.document()
    for line in (
        header or f"Run manifest for {m.name!r}. Edit, then publish it with `volunteer host FILE`."
    ).splitlines():
        doc.add(tomlkit.comment(line))
    doc.add(tomlkit.nl())
    doc.add("name", m.name)
    doc["name"].comment("run name: volunteers type `volunteer join NAME@FINGERPRINT`")
    doc.add("protocol_version", m.protocol_version)
    doc.add("owner", _owner_text(m.owner))
    doc["owner"].comment(f"owner's Ed25519 public key (fingerprint {m.fingerprint}); only it can sign this run")
    doc.add("seed", m.seed)
    doc["seed"].comment("seeds the initial model and the built-in data")
    doc.add("description", m.description)

    model = tomlkit.table()
    model.add("template", m.model.template)
    model["template"].comment(f"one of {', '.join(MODEL_TEMPLATES)}")
    model.add("config", _commented_table(d["model"]["config"], m.model.table))
    doc.add("model", model)

    data = tomlkit.table()
    if isinstance(m.data, BuiltinData):
        data.add("kind", "builtin")
        data["kind"].comment("builtin: generated here, nothing to download; shards: files over HTTP(S)")
        data.add("generator", m.data.generator)
        data["generator"].comment(f"one of {', '.join(DATA_GENERATORS)}")
        data.add("config", _commented_table(d["data"]["config"], data_generator(m.data.generator)))
    else:
        data.add("kind", "shards")
        data.add("format", m.data.format)
        data.add("task", m.data.task)
        data.add("config", _commented_table(d["data"]["config"], shard_task(m.data.task)))
        shards = tomlkit.aot()
        for shard in d["data"]["shards"]:
            shards.append(tomlkit.item(shard))
        data.add("shards", shards)
    doc.add("data", data)

    optimizer = tomlkit.table()
    optimizer.add("name", m.optimizer.name)
    optimizer["name"].comment(f"one of {', '.join(OPTIMIZERS)}")
    optimizer.add("params", _commented_table(d["optimizer"]["params"], optimizer_table(m.optimizer.name)))
    optimizer.add("schedule", _commented_table(d["optimizer"]["schedule"], SCHEDULE_PARAMS))
    doc.add("optimizer", optimizer)

    averaging = _commented_table({k: v for k, v in d["averaging"].items() if k != "compression"}, AVERAGING_PARAMS)
    averaging.add("compression", _commented_table(d["averaging"]["compression"], COMPRESSION_PARAMS))
    doc.add("averaging", averaging)

    if m.experts is not None:
        experts = _commented_table({k: v for k, v in d["experts"].items() if k != "grid"}, EXPERT_PARAMS)
        experts.add("grid", d["experts"]["grid"])
        doc.add("experts", experts)
    else:
        doc.add(tomlkit.nl())
        doc.add(tomlkit.comment("[experts]  # reserved for mixture-of-experts runs (validated, not used yet)"))
        doc.add(tomlkit.comment("grid = [16, 16]"))
    return tomlkit.dumps(doc)


def default_manifest(name: str, template: str, owner: bytes, *, seed: int = 0) -> Manifest:
    """A ready-to-run manifest for a built-in template with built-in data (what ``volunteer run create`` writes)."""
    spec = model_template(template, "--template")
    if spec.task is Task.CLASSIFICATION:
        data: DataSpec = BuiltinData(
            "teacher",
            {"input_dim": spec.params["input_dim"].default, "num_classes": spec.params["num_classes"].default},
        )
        optimizer = OptimizerSpec("adam", {"lr": 3e-3})
    else:
        data = BuiltinData(
            "tokens", {"vocab_size": spec.params["vocab_size"].default, "seq_len": spec.params["seq_len"].default}
        )
        optimizer = OptimizerSpec("adamw", {"lr": 3e-3})
    return Manifest(
        name=check_run_name(name, "NAME"),
        owner=owner,
        model=ModelSpec(template),
        data=data,
        optimizer=optimizer,
        averaging=AveragingSpec(target_batch_size=1024, batch_size=32),
        seed=seed,
        description=f"A {template!r} model trained on built-in generated data.",
    )
