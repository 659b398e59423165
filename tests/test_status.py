from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from volunteer.client.status import (
    MAX_LOSS_POINTS,
    STATES,
    Contribution,
    GpuUse,
    HostUse,
    LogLine,
    LossPoint,
    RoleReport,
    StatusSnapshot,
)
from volunteer.errors import StatusFormatError


def full_snapshot() -> StatusSnapshot:
    """A snapshot with every field set to something other than its default."""
    return StatusSnapshot(
        version="0.1.0",
        peer_id="abc",
        time=1_700_000_000.5,
        uptime_s=12.0,
        state="training",
        reason="",
        machine="8 cores, 16 GiB",
        run="tiny-lm",
        role="trainer",
        throughput=123.5,
        loss=(LossPoint(1, 2.5), LossPoint(2, 2.25)),
        peers=7,
        host=HostUse(
            profile="idle",
            run=True,
            reason="owner away",
            duty_cycle=0.5,
            threads=4,
            use_gpu=True,
            cpu_percent_total=60.0,
            cpu_percent_ours=25.0,
            cpu_cap_percent=25.0,
            memory_used_bytes=10,
            memory_total_bytes=100,
            memory_budget_bytes=50,
            upload_bps=1.0,
            download_bps=2.0,
            upload_cap_bps=3.0,
            download_cap_bps=None,
            user_idle_s=600.0,
            on_battery=True,
            gpus=(GpuUse("RTX", 50.0, 1, 2, 70.0, 80.0, 150.0, 200.0),),
        ),
        contribution=Contribution(samples=5, compute_seconds=1.5, bytes_sent=6, bytes_received=7),
        logs=(LogLine(1.0, "INFO", "hello"),),
    )


def test_round_trip_through_json_and_msgpack() -> None:
    snap = full_snapshot()
    assert StatusSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap
    assert StatusSnapshot.from_dict(msgpack.unpackb(msgpack.packb(snap.to_dict()))) == snap


def test_defaults_round_trip() -> None:
    snap = StatusSnapshot(version="v", peer_id="p", time=0.0, uptime_s=0.0, state="starting", reason="")
    assert StatusSnapshot.from_dict(snap.to_dict()) == snap


@given(
    state=st.sampled_from(STATES),
    reason=st.text(max_size=50),
    loss=st.lists(
        st.tuples(st.integers(0, 2**40), st.floats(allow_nan=False, allow_infinity=False)), max_size=MAX_LOSS_POINTS
    ),
    peers=st.integers(0, 10**6),
)
def test_round_trip_property(state: Any, reason: str, loss: list[tuple[int, float]], peers: int) -> None:
    snap = StatusSnapshot(
        version="v",
        peer_id="p",
        time=1.0,
        uptime_s=2.0,
        state=state,
        reason=reason,
        loss=tuple(LossPoint(s, v) for s, v in loss),
        peers=peers,
    )
    assert StatusSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"state": "dancing"}, "'state' must be one of"),
        ({"peers": -1}, "'peers' must be a non-negative integer"),
        ({"peers": True}, "'peers' must be a non-negative integer"),
        ({"throughput": "fast"}, "'throughput' must be a finite number"),
        ({"uptime_s": -5}, "'uptime_s' must be >= 0"),
        ({"version": None}, "'version' must be a string"),
        ({"reason": "x" * 5000}, "longer than"),
        ({"loss": [{"step": 1}]}, "'loss' is missing"),
        ({"loss": [{"step": 1, "loss": 1.0}] * (MAX_LOSS_POINTS + 1)}, "at most"),
        ({"logs": "not a list"}, "'logs' must be a list"),
        ({"host": "x"}, "host must be an object"),
        ({"contribution": {"samples": 1.5}}, "'samples' must be a non-negative integer"),
    ],
)
def test_bad_fields_are_rejected_with_the_field_name(change: dict[str, Any], message: str) -> None:
    data = full_snapshot().to_dict() | change
    with pytest.raises(StatusFormatError, match=message):
        StatusSnapshot.from_dict(data)


def test_missing_field_and_bad_nested_values() -> None:
    data = full_snapshot().to_dict()
    del data["peer_id"]
    with pytest.raises(StatusFormatError, match="'peer_id' is missing"):
        StatusSnapshot.from_dict(data)
    data = full_snapshot().to_dict()
    data["host"]["duty_cycle"] = 1.5
    with pytest.raises(StatusFormatError, match="between 0 and 1"):
        StatusSnapshot.from_dict(data)
    data = full_snapshot().to_dict()
    data["host"]["cpu_percent_ours"] = math.nan
    with pytest.raises(StatusFormatError, match="finite"):
        StatusSnapshot.from_dict(data)
    with pytest.raises(StatusFormatError, match="snapshot must be an object"):
        StatusSnapshot.from_dict([1, 2])


def test_role_report_counts_and_bounds_history() -> None:
    report = RoleReport()
    report.add_work(samples=10, seconds=1.5, sent=100, received=200)
    report.add_work(samples=5)
    assert report.contribution == Contribution(15, 1.5, 100, 200)
    with pytest.raises(ValueError, match="only grow"):
        report.add_work(samples=-1)
    for step in range(MAX_LOSS_POINTS + 10):
        report.add_loss(step, 1.0 / (step + 1))
    report.add_loss(10**6, math.nan)
    assert len(report.loss) == MAX_LOSS_POINTS
    assert report.loss[0].step == 10
    assert report.loss[-1].step == MAX_LOSS_POINTS + 9
