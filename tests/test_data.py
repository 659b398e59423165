"""Data sources: built-in generators, the shard format, and shard downloads from a local HTTP server."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.http_helpers import serving
from volunteer.errors import DataError
from volunteer.paths import Paths
from volunteer.run.data import (
    DownloadConfig,
    ShardCache,
    ShardedStream,
    TeacherStream,
    TokenStream,
    builtin_stream,
    decode_shard,
    encode_shard,
    evaluation_batch,
    fetch_all,
    fetch_shard,
    load_shard,
    make_shards,
    open_stream,
    shard_samples,
    stream_seed,
)
from volunteer.run.manifest import BuiltinData, Shard, ShardedData
from volunteer.run.models import build_model, task_loss
from volunteer.run.templates import Task

FAST_RETRY = DownloadConfig(retry_delay=0.01, attempts=4, chunk_size=4096)

# --- a local HTTP server with Range support and injectable faults -------------------------------------------


@dataclass
class Files:
    """What the test server serves, and what it saw."""

    content: dict[str, bytes] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)
    """Path -> bytes to send before dropping the connection (once per entry, then removed)."""
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    """(path, Range header) of every GET."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    files: Files
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        files = self.files
        with files.lock:
            files.requests.append((self.path, self.headers.get("Range")))
            body = files.content.get(self.path)
            drop = files.drop_after.pop(self.path, None)
        if body is None:
            self.send_error(404)
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not files.ignore_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        try:
            if drop is not None:
                self.wfile.write(body[start : start + drop])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body[start:])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[tuple[str, Files]]:
    files = Files()
    handler = type("Handler", (_Handler,), {"files": files})
    with serving(handler) as url:
        yield url, files


def _classification_arrays(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 8)).astype(np.float32),
        "y": np.arange(rows, dtype=np.int64) % 5,
    }


def _publish(base: str, files: Files, arrays: dict[str, np.ndarray], rows_per_shard: int) -> ShardedData:
    shards = []
    for index, (blob, digest, size) in enumerate(make_shards(arrays, rows_per_shard)):
        files.content[f"/s{index}.vshard"] = blob
        shards.append(Shard(f"{base}/s{index}.vshard", size, digest))
    return ShardedData("classification", {"input_dim": 8, "num_classes": 5}, tuple(shards))


# --- built-in data ------------------------------------------------------------------------------------------


def test_streams_are_deterministic_per_peer_and_differ_between_peers() -> None:
    spec = BuiltinData("teacher", {"input_dim": 16, "num_classes": 4})
    a1, a2 = builtin_stream(spec, 7, "peer-a").sample(64), builtin_stream(spec, 7, "peer-a").sample(64)
    b = builtin_stream(spec, 7, "peer-b").sample(64)
    assert torch.equal(a1.inputs, a2.inputs)
    assert torch.equal(a1.targets, a2.targets)
    assert not torch.equal(a1.inputs, b.inputs)
    assert stream_seed(7, "peer-a") != stream_seed(8, "peer-a")


def test_all_peers_learn_the_same_teacher() -> None:
    spec = BuiltinData("teacher", {"input_dim": 16, "num_classes": 4})
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(0))
    one, two = TeacherStream(spec.config, 7, "peer-a"), TeacherStream(spec.config, 7, "peer-b")
    other_run = TeacherStream(spec.config, 8, "peer-a")

    def label(stream: TeacherStream) -> torch.Tensor:
        return (torch.tanh(x @ stream._w1 + stream._b1) @ stream._w2).argmax(1)

    assert torch.equal(label(one), label(two))
    assert not torch.equal(label(one), label(other_run))
    assert len(set(one.sample(2000).targets.tolist())) == 4  # every class occurs


def test_label_noise_changes_some_labels() -> None:
    clean = builtin_stream(BuiltinData("teacher", {"input_dim": 8, "num_classes": 4}), 1, "p").sample(2000)
    noisy = builtin_stream(
        BuiltinData("teacher", {"input_dim": 8, "num_classes": 4, "label_noise": 0.5}), 1, "p"
    ).sample(2000)
    assert torch.equal(clean.inputs, noisy.inputs)
    changed = (clean.targets != noisy.targets).float().mean().item()
    assert 0.2 < changed < 0.5


def test_copy_task_repeats_its_first_half() -> None:
    stream = TokenStream(BuiltinData("tokens", {"seq_len": 9, "task": "copy", "vocab_size": 50}).config, 0, "p")
    seqs = stream.sequences(4)
    assert seqs.shape == (4, 10)
    assert torch.equal(seqs[:, :5], seqs[:, 5:])
    batch = stream.sample(3)
    assert batch.inputs.shape == batch.targets.shape == (3, 9)


def test_markov_grammar_only_uses_allowed_successors() -> None:
    stream = TokenStream(BuiltinData("tokens", {"vocab_size": 20, "seq_len": 30, "branching": 2}).config, 3, "p")
    seqs = stream.sequences(50)
    assert int(seqs.min()) >= 0
    assert int(seqs.max()) < 20
    allowed = {(a, int(b)) for a in range(20) for b in stream._successors[a]}
    pairs = set(zip(seqs[:, :-1].flatten().tolist(), seqs[:, 1:].flatten().tolist(), strict=True))
    assert pairs <= allowed


@pytest.mark.parametrize(
    ("template", "model_config", "data"),
    [
        (
            "mlp",
            {"input_dim": 16, "num_classes": 4, "hidden_dim": 64},
            BuiltinData("teacher", {"input_dim": 16, "num_classes": 4}),
        ),
        (
            "tiny-lm",
            {"vocab_size": 16, "seq_len": 16, "d_model": 32, "n_layers": 1, "d_ff": 64},
            BuiltinData("tokens", {"vocab_size": 16, "seq_len": 16, "branching": 2}),
        ),
    ],
)
async def test_builtin_data_is_learnable(template: str, model_config: dict[str, int], data: BuiltinData) -> None:
    model = build_model(template, model_config, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    stream = builtin_stream(data, 5, "peer")
    held_out = evaluation_batch(data, 5, 512)
    with torch.no_grad():
        before = float(task_loss(stream.task, model(held_out.inputs), held_out.targets))
    for _ in range(150):
        batch = await stream.next_batch(32)
        loss = task_loss(stream.task, model(batch.inputs), batch.targets)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    with torch.no_grad():
        after = float(task_loss(stream.task, model(held_out.inputs), held_out.targets))
    assert after < 0.7 * before


# --- the shard format ---------------------------------------------------------------------------------------


def test_shard_round_trip() -> None:
    arrays: dict[str, np.ndarray] = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "y": np.array([0, 1, 2], dtype=np.uint8),
    }
    decoded = decode_shard(encode_shard(arrays))
    assert np.array_equal(decoded["x"], arrays["x"])
    assert np.array_equal(decoded["y"], arrays["y"])
    batch = shard_samples(Task.CLASSIFICATION, {"input_dim": 4, "num_classes": 3}, decoded)
    assert batch.inputs.dtype == torch.float32
    assert batch.targets.tolist() == [0, 1, 2]
    tokens = decode_shard(encode_shard({"tokens": np.arange(10, dtype=np.uint16).reshape(2, 5)}))
    lm = shard_samples(Task.LANGUAGE_MODEL, {"vocab_size": 10, "seq_len": 4}, tokens)
    assert lm.inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert lm.targets.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]


def _good() -> bytes:
    return encode_shard({"x": np.zeros((2, 4), np.float32), "y": np.zeros(2, np.int64)})


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"PK\x03\x04 not a shard", "bad magic"),
        (_good()[:-1], "ends before"),
        (_good() + b"\x00", "beyond what its header"),
        (b"VSHARD1\x00" + (10**6).to_bytes(4, "little") + b"{}", "too long"),
        (b"VSHARD1\x00" + (3).to_bytes(4, "little") + b"{x}", "not JSON"),
        (b"VSHARD1\x00" + (2).to_bytes(4, "little") + b"[]", "must be"),
        (_good().replace(b'"float32"', b'"float64"'), "unsupported dtype"),
        (_good().replace(b'"y"', b'"z"'), "unexpected or repeated"),
        (_good().replace(b"[2,4]", b'["2"]'), "bad shape"),
    ],
)
def test_malformed_shards_are_refused(blob: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        decode_shard(blob)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 4), np.float32), "y": np.array([0, 9])}, "labels outside"),
        ({"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)}, "do not fit input_dim"),
        ({"x": np.full((2, 4), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "NaN"),
        ({"x": np.zeros((2, 4), np.float32)}, "holds x and y"),
        ({"x": np.zeros((2, 4), np.int32), "y": np.zeros(2, np.int64)}, "float features"),
    ],
)
def test_shards_that_do_not_fit_the_manifest_are_refused(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(DataError, match=message):
        shard_samples(Task.CLASSIFICATION, {"input_dim": 4, "num_classes": 5}, decode_shard(encode_shard(arrays)))


def test_token_shards_are_checked() -> None:
    config = {"vocab_size": 10, "seq_len": 4}
    with pytest.raises(DataError, match="tokens outside"):
        shard_samples(Task.LANGUAGE_MODEL, config, {"tokens": np.full((1, 5), 10, np.int32)})
    with pytest.raises(DataError, match="shape"):
        shard_samples(Task.LANGUAGE_MODEL, config, {"tokens": np.zeros((1, 4), np.int32)})


# --- downloads ----------------------------------------------------------------------------------------------


async def test_download_verifies_caches_and_reports_progress(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    spec = _publish(base, files, _classification_arrays(4000), 4000)
    shard = spec.shards[0]
    cache = ShardCache(tmp_path)
    seen: list[int] = []
    async with httpx.AsyncClient() as client:
        path = await fetch_shard(
            client, shard, cache, progress=lambda s, done, total: seen.append(done), config=FAST_RETRY
        )
        assert path.read_bytes() == files.content["/s0.vshard"]
        assert seen[0] == 0
        assert seen[-1] == shard.size
        assert seen == sorted(seen)
        assert len(seen) > 2
        assert await fetch_shard(client, shard, cache) == path  # cached: no second request
    assert len(files.requests) == 1
    assert not cache.partial(shard).exists()


async def test_download_resumes_after_a_dropped_connection(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    spec = _publish(base, files, _classification_arrays(4000), 4000)
    shard = spec.shards[0]
    files.drop_after["/s0.vshard"] = 50_000
    async with httpx.AsyncClient() as client:
        path = await fetch_shard(client, shard, ShardCache(tmp_path), config=FAST_RETRY)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
    assert len(files.requests) == 2
    assert files.requests[0][1] is None
    assert files.requests[1][1] is not None
    resumed_from = int(files.requests[1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 50_000


async def test_a_partial_file_from_an_earlier_run_is_resumed(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    spec = _publish(base, files, _classification_arrays(1000), 1000)
    shard = spec.shards[0]
    cache = ShardCache(tmp_path)
    cache.partial(shard).write_bytes(files.content["/s0.vshard"][:1234])
    async with httpx.AsyncClient() as client:
        path = await fetch_shard(client, shard, cache, config=FAST_RETRY)
    assert path.read_bytes() == files.content["/s0.vshard"]
    assert files.requests == [("/s0.vshard", "bytes=1234-")]


async def test_a_server_that_ignores_ranges_restarts_the_file(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    files.ignore_range = True
    spec = _publish(base, files, _classification_arrays(1000), 1000)
    shard = spec.shards[0]
    cache = ShardCache(tmp_path)
    cache.partial(shard).write_bytes(b"garbage that must not stay")
    async with httpx.AsyncClient() as client:
        path = await fetch_shard(client, shard, cache, config=FAST_RETRY)
    assert path.read_bytes() == files.content["/s0.vshard"]


async def test_checksum_mismatch_deletes_the_download(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    spec = _publish(base, files, _classification_arrays(1000), 1000)
    shard = spec.shards[0]
    good = files.content["/s0.vshard"]
    files.content["/s0.vshard"] = good[:-1] + bytes([good[-1] ^ 0xFF])  # same size, one byte off
    cache = ShardCache(tmp_path)
    async with httpx.AsyncClient() as client:
        with pytest.raises(DataError, match=f"does not match its checksum.*expected sha256 {shard.sha256}.*deleted"):
            await fetch_shard(client, shard, cache, config=FAST_RETRY)
    assert not cache.path(shard).exists()
    assert not cache.partial(shard).exists()


async def test_server_errors(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    spec = _publish(base, files, _classification_arrays(100), 100)
    shard = spec.shards[0]
    missing = Shard(f"{base}/missing", 10, "0" * 64)
    too_small = Shard(shard.url, shard.size - 10, shard.sha256)
    async with httpx.AsyncClient() as client:
        with pytest.raises(DataError, match="HTTP 404"):
            await fetch_shard(client, missing, ShardCache(tmp_path), config=FAST_RETRY)
        with pytest.raises(DataError, match="larger than the manifest"):
            await fetch_shard(client, too_small, ShardCache(tmp_path), config=FAST_RETRY)
        unreachable = Shard("http://127.0.0.1:9/x", 10, "0" * 64)
        with pytest.raises(DataError, match="after 2 attempts"):
            await fetch_shard(
                client, unreachable, ShardCache(tmp_path), config=DownloadConfig(attempts=2, retry_delay=0.01)
            )


async def test_a_corrupted_cache_file_is_deleted_not_used(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    spec = _publish(base, files, _classification_arrays(100), 100)
    shard = spec.shards[0]
    cache = ShardCache(tmp_path)
    async with httpx.AsyncClient() as client:
        path = await fetch_shard(client, shard, cache, config=FAST_RETRY)
    batch = await load_shard(path, shard, Task.CLASSIFICATION, spec.config)
    assert batch.size == 100
    path.write_bytes(b"x" * shard.size)
    with pytest.raises(DataError, match="corrupted on disk"):
        await load_shard(path, shard, Task.CLASSIFICATION, spec.config)
    assert not path.exists()


async def test_each_peer_reads_the_shards_in_its_own_order(server: tuple[str, Files], tmp_path: Path) -> None:
    base, files = server
    arrays = _classification_arrays(600)
    arrays["x"][:, 0] = np.arange(600)  # tag each row
    spec = _publish(base, files, arrays, 100)
    async with httpx.AsyncClient() as client:
        orders = []
        for peer in range(2):
            stream = ShardedStream(spec, ShardCache(tmp_path), client, random.Random(peer), download=FAST_RETRY)
            first = await stream.next_batch(250)  # spans three shards
            orders.append([s.url for s in stream.upcoming()])
            rest = await stream.next_batch(350)
            rows = torch.cat([first.inputs[:, 0], rest.inputs[:, 0]]).long().tolist()
            assert sorted(rows) == list(range(600))  # one pass: every sample exactly once
            assert stream.shards_loaded == 6
            labels = torch.cat([first.targets, rest.targets]).tolist()
            assert all(label == row % 5 for row, label in zip(rows, labels, strict=True))
    assert orders[0] != orders[1]
    assert len({path for path, _ in files.requests}) == 6  # the second peer used the cache


async def test_open_stream_for_shards_uses_the_cache_dir(server: tuple[str, Files]) -> None:
    base, files = server
    spec = _publish(base, files, _classification_arrays(50), 50)
    cache_dir = Paths.default().cache_dir
    async with httpx.AsyncClient() as client:
        stream = open_stream(spec, 1, "peer", cache_dir=cache_dir, client=client)
        batch = await stream.next_batch(10)
        assert batch.inputs.shape == (10, 8)
        paths = await fetch_all(client, spec.shards, ShardCache(cache_dir / "shards"))
    assert paths[0].parent == cache_dir / "shards"
    with pytest.raises(DataError, match="needs an HTTP client"):
        open_stream(spec, 1, "peer", cache_dir=cache_dir)
