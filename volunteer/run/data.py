"""Training data: built-in generated tasks, and sharded datasets downloaded over HTTP(S).

Built-in data (``data.kind = "builtin"``) needs nothing from outside. Everything the task *is* (the teacher
network, the grammar) comes from the run seed, so all peers learn the same task; every peer draws its own
samples from ``(run seed, peer seed)`` (:func:`stream_seed`), so peers contribute different samples.

- ``teacher``: Gaussian features labelled by the argmax of a random two-layer tanh network. An MLP student
  learns it quickly: the loss visibly falls within seconds on one CPU core.
- ``tokens``: sequences from a sparse random Markov grammar (each token has ``branching`` likely successors,
  so a model can get far below the uniform ``log(vocab)`` loss), or a copy task (a random half, then the
  same half again: the second half is perfectly predictable).

Sharded data (``data.kind = "shards"``) lists shard URLs with their sizes and SHA-256 in the signed
manifest. :func:`fetch_shard` downloads one into the cache (resuming with HTTP ``Range`` after a dropped
connection, reporting progress), verifies the checksum and only then moves it into place; a mismatch
deletes the file and raises :class:`~volunteer.errors.DataError`. :class:`ShardedStream` reads the shards
in this peer's own random order and checks the checksum again when it loads a shard from the cache.

The shard format (``vshard-1``) is raw tensors after a small JSON header, so nothing is ever unpickled::

    b"VSHARD1\\0"                 8 bytes, magic
    header length                 uint32, little-endian, at most 64 KiB
    header                        UTF-8 JSON: {"tensors": [{"name": "x", "dtype": "float32", "shape": [N, D]}, ...]}
    payload                       each tensor's bytes, little-endian, C order, back to back; nothing after

Classification shards hold ``x`` (float32/float16, ``[N, input_dim]``) and ``y`` (integer, ``[N]``, each
below ``num_classes``); language-model shards hold ``tokens`` (integer, ``[N, seq_len + 1]``, each below
``vocab_size``). Everything is checked before use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import httpx
import numpy as np
import torch

from volunteer.errors import DataError
from volunteer.run.manifest import SHARD_FORMAT, BuiltinData, DataSpec, Shard, ShardedData
from volunteer.run.templates import Config, Task

log = logging.getLogger(__name__)

SHARD_MAGIC: Final = b"VSHARD1\x00"
"""First bytes of every ``vshard-1`` file."""

MAX_HEADER_BYTES: Final = 64 * 1024
"""Largest JSON header of a shard."""

_DTYPES: Final[Mapping[str, np.dtype[np.generic]]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "uint16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
}
_FLOAT_DTYPES: Final = frozenset({"float32", "float16"})
_TENSOR_NAMES: Final = frozenset({"x", "y", "tokens"})


@dataclass(frozen=True, slots=True)
class Batch:
    """One training batch: model inputs and the targets of the loss (see :func:`volunteer.run.models.task_loss`)."""

    inputs: torch.Tensor
    """Features ``[B, input_dim]`` (float32) or token ids ``[B, T]`` (int64)."""
    targets: torch.Tensor
    """Labels ``[B]`` or next tokens ``[B, T]`` (int64)."""

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return int(self.inputs.shape[0])


class DataStream(Protocol):
    """An endless source of batches for one peer."""

    @property
    def task(self) -> Task:
        """What the batches are for."""
        ...

    async def next_batch(self, batch_size: int) -> Batch:
        """The next ``batch_size`` samples of this peer's stream."""
        ...


def stream_seed(run_seed: int, peer_seed: int | str | bytes) -> int:
    """A 63-bit seed for one peer's stream, mixed from the run seed and the peer's own seed (e.g. its PeerID)."""
    peer = peer_seed if isinstance(peer_seed, bytes) else str(peer_seed).encode()
    digest = hashlib.sha256(b"volunteer/data-stream\x00" + str(run_seed).encode() + b"\x00" + peer).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- built-in generated data ------------------------------------------------------------------------------


class TeacherStream:
    """Classification by a random teacher network (fixed by the run seed) on Gaussian inputs (per peer)."""

    task = Task.CLASSIFICATION

    def __init__(self, config: Config, run_seed: int, peer_seed: int | str | bytes) -> None:
        self.input_dim = int(config["input_dim"])
        self.num_classes = int(config["num_classes"])
        self.label_noise = float(config["label_noise"])
        hidden = int(config["teacher_hidden"])
        teacher = _generator(stream_seed(run_seed, "teacher"))
        self._w1 = torch.randn(self.input_dim, hidden, generator=teacher) / math.sqrt(self.input_dim)
        self._b1 = 0.5 * torch.randn(hidden, generator=teacher)
        self._w2 = torch.randn(hidden, self.num_classes, generator=teacher) / math.sqrt(hidden)
        self._rng = _generator(stream_seed(run_seed, peer_seed))

    def sample(self, batch_size: int) -> Batch:
        """Draw ``batch_size`` labelled samples from this peer's stream."""
        x = torch.randn(batch_size, self.input_dim, generator=self._rng)
        y = (torch.tanh(x @ self._w1 + self._b1) @ self._w2).argmax(dim=1)
        if self.label_noise > 0:
            flip = torch.rand(batch_size, generator=self._rng) < self.label_noise
            noise = torch.randint(0, self.num_classes, (batch_size,), generator=self._rng)
            y = torch.where(flip, noise, y)
        return Batch(x, y)

    async def next_batch(self, batch_size: int) -> Batch:
        """:meth:`sample` (cheap enough for the event loop at the sizes the templates allow per step)."""
        return self.sample(batch_size)


class TokenStream:
    """Token sequences of ``seq_len + 1`` tokens from a seeded Markov grammar or a copy task."""

    task = Task.LANGUAGE_MODEL

    def __init__(self, config: Config, run_seed: int, peer_seed: int | str | bytes) -> None:
        self.vocab_size = int(config["vocab_size"])
        self.seq_len = int(config["seq_len"])
        self.kind = str(config["task"])
        branching = min(int(config["branching"]), self.vocab_size)
        grammar = _generator(stream_seed(run_seed, "grammar"))
        # Each token's successors: `branching` distinct tokens with random, uneven probabilities.
        self._successors = torch.stack(
            [torch.randperm(self.vocab_size, generator=grammar)[:branching] for _ in range(self.vocab_size)]
        )
        weights = torch.rand(self.vocab_size, branching, generator=grammar) + 0.1
        self._probs = weights / weights.sum(dim=1, keepdim=True)
        self._rng = _generator(stream_seed(run_seed, peer_seed))

    def sequences(self, batch_size: int) -> torch.Tensor:
        """``[batch_size, seq_len + 1]`` token ids."""
        length = self.seq_len + 1
        if self.kind == "copy":
            half = (length + 1) // 2
            first = torch.randint(0, self.vocab_size, (batch_size, half), generator=self._rng)
            return torch.cat([first, first[:, : length - half]], dim=1)
        out = torch.empty(batch_size, length, dtype=torch.int64)
        out[:, 0] = torch.randint(0, self.vocab_size, (batch_size,), generator=self._rng)
        for t in range(1, length):
            prev = out[:, t - 1]
            choice = torch.multinomial(self._probs[prev], 1, generator=self._rng).squeeze(1)
            out[:, t] = self._successors[prev, choice]
        return out

    def sample(self, batch_size: int) -> Batch:
        """Draw ``batch_size`` sequences: inputs are the first ``seq_len`` tokens, targets the next ones."""
        seqs = self.sequences(batch_size)
        return Batch(seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous())

    async def next_batch(self, batch_size: int) -> Batch:
        """:meth:`sample`, off the event loop (a loop over positions)."""
        return await asyncio.to_thread(self.sample, batch_size)


BuiltinStream = TeacherStream | TokenStream


def builtin_stream(spec: BuiltinData, run_seed: int, peer_seed: int | str | bytes) -> BuiltinStream:
    """This peer's stream of the built-in generator ``spec`` names."""
    if spec.generator == "teacher":
        return TeacherStream(spec.config, run_seed, peer_seed)
    if spec.generator == "tokens":
        return TokenStream(spec.config, run_seed, peer_seed)
    raise DataError(f"the built-in generator {spec.generator!r} has no implementation")


def evaluation_batch(spec: BuiltinData, run_seed: int, size: int) -> Batch:
    """A fixed held-out batch of built-in data, identical on every peer (for comparable loss reports)."""
    return builtin_stream(spec, run_seed, "evaluation").sample(size)


# --- the shard format -------------------------------------------------------------------------------------


def encode_shard(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays as a ``vshard-1`` file (see the module docs)."""
    entries = []
    payload = []
    for name, array in tensors.items():
        dtype_name = next((key for key, dt in _DTYPES.items() if dt == array.dtype.newbyteorder("<")), None)
        if dtype_name is None or name not in _TENSOR_NAMES:
            raise DataError(f"cannot store tensor {name!r} of dtype {array.dtype} in a shard")
        entries.append({"name": name, "dtype": dtype_name, "shape": list(array.shape)})
        payload.append(np.ascontiguousarray(array, dtype=_DTYPES[dtype_name]).tobytes())
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return SHARD_MAGIC + struct.pack("<I", len(header)) + header + b"".join(payload)


def decode_shard(data: bytes) -> dict[str, np.ndarray]:
    """Parse a ``vshard-1`` file; anything malformed raises :class:`DataError`. The arrays are read-only views."""
    if len(data) < len(SHARD_MAGIC) + 4 or not data.startswith(SHARD_MAGIC):
        raise DataError("not a vshard-1 file (bad magic)")
    (header_len,) = struct.unpack_from("<I", data, len(SHARD_MAGIC))
    start = len(SHARD_MAGIC) + 4
    if header_len > MAX_HEADER_BYTES or start + header_len > len(data):
        raise DataError(f"shard header of {header_len} bytes is too long")
    try:
        header = json.loads(data[start : start + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"shard header is not JSON: {exc}") from exc
    if type(header) is not dict or set(header) != {"tensors"} or type(header["tensors"]) is not list:
        raise DataError('shard header must be {"tensors": [...]}')
    offset = start + header_len
    out: dict[str, np.ndarray] = {}
    for entry in header["tensors"][:8]:
        if type(entry) is not dict or set(entry) != {"name", "dtype", "shape"}:
            raise DataError("each shard tensor needs exactly name, dtype and shape")
        name, dtype_name, shape = entry["name"], entry["dtype"], entry["shape"]
        if name not in _TENSOR_NAMES or name in out:
            raise DataError(f"unexpected or repeated shard tensor {name!r:.40}")
        if dtype_name not in _DTYPES:
            raise DataError(f"shard tensor {name}: unsupported dtype {dtype_name!r:.40}")
        if type(shape) is not list or not 1 <= len(shape) <= 2 or any(type(d) is not int or d < 0 for d in shape):
            raise DataError(f"shard tensor {name}: bad shape {shape!r:.80}")
        dtype = _DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > len(data):
            raise DataError(f"shard tensor {name}: the file ends before its {nbytes} bytes")
        out[name] = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        offset += nbytes
    if len(header["tensors"]) > 8 or offset != len(data):
        raise DataError("shard has bytes or tensors beyond what its header describes")
    return out


def shard_samples(task: Task, config: Config, tensors: Mapping[str, np.ndarray]) -> Batch:
    """Check decoded shard tensors against the manifest's task and dims; all samples as one :class:`Batch`."""
    if task is Task.CLASSIFICATION:
        if set(tensors) != {"x", "y"}:
            raise DataError(f"a classification shard holds x and y, not {sorted(tensors)}")
        x, y = tensors["x"], tensors["y"]
        if x.dtype.name not in _FLOAT_DTYPES or y.dtype.kind not in "iu":
            raise DataError("classification shards hold float features x and integer labels y")
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[1] != config["input_dim"]:
            raise DataError(
                f"shard shapes x{list(x.shape)} y{list(y.shape)} do not fit input_dim {config['input_dim']}"
            )
        if y.size and (int(y.min()) < 0 or int(y.max()) >= int(config["num_classes"])):
            raise DataError(f"shard labels outside 0..{int(config['num_classes']) - 1}")
        inputs = torch.from_numpy(x.astype(np.float32))
        if not bool(torch.isfinite(inputs).all()):
            raise DataError("shard features contain NaN or infinity")
        return Batch(inputs, torch.from_numpy(y.astype(np.int64)))
    if set(tensors) != {"tokens"}:
        raise DataError(f"a language-model shard holds tokens, not {sorted(tensors)}")
    tokens = tensors["tokens"]
    if tokens.dtype.kind not in "iu" or tokens.ndim != 2 or tokens.shape[1] != int(config["seq_len"]) + 1:
        raise DataError(f"shard tokens must be integers of shape [N, {int(config['seq_len']) + 1}]")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= int(config["vocab_size"])):
        raise DataError(f"shard tokens outside 0..{int(config['vocab_size']) - 1}")
    seqs = torch.from_numpy(tokens.astype(np.int64))
    return Batch(seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous())


def make_shards(arrays: Mapping[str, np.ndarray], rows_per_shard: int) -> list[tuple[bytes, str, int]]:
    """Cut a dataset into ``vshard-1`` files: a list of (file bytes, sha256 hex, size)."""
    rows = len(next(iter(arrays.values())))
    if rows_per_shard < 1 or any(len(a) != rows for a in arrays.values()):
        raise DataError("every array needs the same number of rows, and a shard at least one")
    out = []
    for begin in range(0, rows, rows_per_shard):
        blob = encode_shard({name: a[begin : begin + rows_per_shard] for name, a in arrays.items()})
        out.append((blob, hashlib.sha256(blob).hexdigest(), len(blob)))
    return out


# --- downloading ------------------------------------------------------------------------------------------

ProgressCallback = Callable[[Shard, int, int], None]
"""Called with (shard, bytes present, shard size) as a download advances (also once when it starts)."""


@dataclass(frozen=True, slots=True)
class DownloadConfig:
    """Timeouts and retries of shard downloads."""

    connect_timeout: float = 10.0
    """Seconds to open a connection."""
    read_timeout: float = 30.0
    """Seconds without a byte from the server before the attempt fails (and is resumed)."""
    attempts: int = 5
    """Tries per shard; each resumes where the last one stopped."""
    retry_delay: float = 0.5
    """Seconds before the second try, doubling after each failure (capped at 30 s)."""
    chunk_size: int = 1 << 16
    """Bytes read and written at a time."""

    def timeout(self) -> httpx.Timeout:
        """The httpx timeout of every request."""
        return httpx.Timeout(self.read_timeout, connect=self.connect_timeout)


class ShardCache:
    """Verified shards in a directory (usually ``Paths.cache_dir / "shards"``), named by their SHA-256.

    One client per installation writes here (the instance lock sees to that), so a partial file belongs to
    us and can be resumed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, shard: Shard) -> Path:
        """Where the verified shard lives."""
        return self.root / f"{shard.sha256}.vshard"

    def partial(self, shard: Shard) -> Path:
        """Where its download in progress lives."""
        return self.root / f"{shard.sha256}.part"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _partial_size(part: Path, size: int) -> int:
    """Bytes of ``part`` already downloaded (a file longer than the shard is discarded)."""
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        return 0
    return have


class _Retry(Exception):
    """This attempt failed in a way worth resuming."""


async def fetch_shard(
    client: httpx.AsyncClient,
    shard: Shard,
    cache: ShardCache,
    *,
    progress: ProgressCallback | None = None,
    config: DownloadConfig | None = None,
) -> Path:
    """Download ``shard`` into ``cache`` (resuming a partial file), verify its SHA-256, return its path.

    Connection failures and 5xx answers are retried with HTTP ``Range`` from the bytes already on disk. A
    checksum mismatch deletes the download and raises :class:`DataError`; so do 4xx answers and a server
    that sends more bytes than the manifest says.
    """
    config = config or DownloadConfig()
    final = cache.path(shard)
    if final.exists():
        return final
    cache.root.mkdir(parents=True, exist_ok=True)
    part = cache.partial(shard)
    delay = config.retry_delay
    for attempt in range(1, config.attempts + 1):
        try:
            await _download_attempt(client, shard, part, progress, config)
            break
        except _Retry as exc:
            if attempt == config.attempts:
                raise DataError(f"could not download {shard.url} after {attempt} attempts: {exc}") from exc
            log.info("shard %s: %s; resuming in %.1f s (attempt %d)", shard.url, exc, delay, attempt + 1)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 30.0)
    actual = await asyncio.to_thread(_file_sha256, part)
    if actual != shard.sha256:
        part.unlink(missing_ok=True)
        raise DataError(
            f"the shard {shard.url} does not match its checksum (expected sha256 {shard.sha256}, got {actual}); "
            "the download was deleted and is never used. The server or the manifest is wrong: tell the run's owner"
        )
    os.replace(part, final)
    return final


async def _download_attempt(
    client: httpx.AsyncClient, shard: Shard, part: Path, progress: ProgressCallback | None, config: DownloadConfig
) -> None:
    have = await asyncio.to_thread(_partial_size, part, shard.size)
    if progress is not None:
        progress(shard, have, shard.size)
    if have == shard.size:
        return
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        async with client.stream("GET", shard.url, headers=headers, timeout=config.timeout()) as response:
            if response.status_code == 416:
                await asyncio.to_thread(part.unlink, missing_ok=True)
                raise _Retry("the server refused the resume range; starting over")
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retry(f"HTTP {response.status_code}")
            if response.status_code not in (200, 206):
                raise DataError(f"could not download {shard.url}: HTTP {response.status_code}")
            if response.status_code == 206:
                if not response.headers.get("content-range", "").startswith(f"bytes {have}-"):
                    await asyncio.to_thread(part.unlink, missing_ok=True)
                    raise _Retry("the server resumed at another offset; starting over")
            else:
                have = 0  # the server ignored the range: it sends the whole file
            with part.open("ab" if have else "wb") as handle:
                async for chunk in response.aiter_raw(config.chunk_size):
                    if have + len(chunk) > shard.size:
                        handle.close()
                        await asyncio.to_thread(part.unlink, missing_ok=True)
                        raise DataError(f"{shard.url} is larger than the manifest's {shard.size} bytes")
                    handle.write(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(shard, have, shard.size)
    except httpx.TransportError as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc
    if have != shard.size:
        raise _Retry(f"the connection ended after {have} of {shard.size} bytes")


async def load_shard(path: Path, shard: Shard, task: Task, config: Config) -> Batch:
    """Read a cached shard, verify its checksum again, decode and check it; a bad file is deleted."""

    def read() -> Batch:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            path.unlink(missing_ok=True)
            raise DataError(
                f"the cached shard {path} was corrupted on disk; it was deleted and will be downloaded again"
            )
        try:
            return shard_samples(task, config, decode_shard(data))
        except DataError as exc:
            raise DataError(f"the shard {shard.url} is unusable: {exc}") from exc

    return await asyncio.to_thread(read)


class ShardedStream:
    """One peer's endless pass over a sharded dataset: shards in its own random order (reshuffled every pass),
    samples shuffled within each shard, downloads on demand."""

    def __init__(
        self,
        spec: ShardedData,
        cache: ShardCache,
        client: httpx.AsyncClient,
        rng: random.Random,
        *,
        progress: ProgressCallback | None = None,
        download: DownloadConfig | None = None,
    ) -> None:
        self.spec = spec
        self.task = Task(spec.task)
        self._cache = cache
        self._client = client
        self._rng = rng
        self._progress = progress
        self._download = download or DownloadConfig()
        self._order: list[int] = []
        self._pending: list[Batch] = []
        self.shards_loaded = 0
        """Shards read so far (for status and tests)."""

    def _next_shard(self) -> Shard:
        if not self._order:
            self._order = list(range(len(self.spec.shards)))
            self._rng.shuffle(self._order)
            self._order.reverse()  # pop() from the end takes them in shuffled order
        return self.spec.shards[self._order.pop()]

    def upcoming(self) -> list[Shard]:
        """The shards left in this pass, in the order this peer will read them."""
        return [self.spec.shards[i] for i in reversed(self._order)]

    async def next_batch(self, batch_size: int) -> Batch:
        """The next ``batch_size`` samples (downloading and loading shards as needed)."""
        while sum(piece.size for piece in self._pending) < batch_size:
            shard = self._next_shard()
            path = await fetch_shard(self._client, shard, self._cache, progress=self._progress, config=self._download)
            samples = await load_shard(path, shard, self.task, self.spec.config)
            self.shards_loaded += 1
            if samples.size == 0:
                continue
            perm = torch.randperm(samples.size, generator=_generator(self._rng.getrandbits(63)))
            self._pending.append(Batch(samples.inputs[perm], samples.targets[perm]))
        return self._take(batch_size)

    def _take(self, batch_size: int) -> Batch:
        inputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        need = batch_size
        while need:
            piece = self._pending[0]
            n = min(need, piece.size)
            inputs.append(piece.inputs[:n])
            targets.append(piece.targets[:n])
            if n == piece.size:
                self._pending.pop(0)
            else:
                self._pending[0] = Batch(piece.inputs[n:], piece.targets[n:])
            need -= n
        return Batch(torch.cat(inputs), torch.cat(targets))


async def fetch_all(
    client: httpx.AsyncClient,
    shards: Sequence[Shard],
    cache: ShardCache,
    *,
    progress: ProgressCallback | None = None,
    config: DownloadConfig | None = None,
) -> list[Path]:
    """Download every shard (one at a time, in order) into the cache; returns their paths."""
    return [await fetch_shard(client, shard, cache, progress=progress, config=config) for shard in shards]


def open_stream(
    spec: DataSpec,
    run_seed: int,
    peer_seed: int | str | bytes,
    *,
    cache_dir: Path,
    client: httpx.AsyncClient | None = None,
    progress: ProgressCallback | None = None,
) -> DataStream:
    """This peer's stream for a manifest's data source (``client`` is required for sharded data)."""
    if isinstance(spec, BuiltinData):
        return builtin_stream(spec, run_seed, peer_seed)
    if spec.format != SHARD_FORMAT:
        raise DataError(f"unknown shard format {spec.format!r}")
    if client is None:
        raise DataError("a sharded dataset needs an HTTP client")
    rng = random.Random(stream_seed(run_seed, peer_seed))
    return ShardedStream(spec, ShardCache(cache_dir / "shards"), client, rng, progress=progress)
