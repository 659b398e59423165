"""The throttle policy, table-driven: every preference has rows that show it taking effect."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volunteer.config import Preferences, describe_fields, load_preferences
from volunteer.host.detect import CPUInfo, GPUInfo, HardwareProfile
from volunteer.host.throttle import GPUReading, Readings, ThrottleDecision, cpu_plan, decide
from volunteer.paths import Paths

GIB = 2**30
MONDAY_NOON = datetime(2024, 5, 6, 12, 0)
MONDAY_2300 = datetime(2024, 5, 6, 23, 0)

PROFILE = HardwareProfile(
    os_name="Linux",
    os_release="6.8",
    machine="x86_64",
    python_version="3.11",
    torch_version="2.5",
    cpu=CPUInfo("Test CPU", 4, 8, None),
    memory_total_bytes=16 * GIB,
    memory_available_bytes=12 * GIB,
    disk_total_bytes=100 * GIB,
    disk_free_bytes=50 * GIB,
    battery=None,
    gpus=(GPUInfo(0, "cuda", "Test GPU", 8 * GIB, "8.6"),),
)
NO_GPU = dataclasses.replace(PROFILE, gpus=())

ACTIVE = Readings(
    cpu_percent_total=10.0,
    cpu_percent_ours=5.0,
    user_idle_s=0.0,
    on_battery=False,
    memory_total_bytes=16 * GIB,
    memory_used_bytes=4 * GIB,
    memory_ours_bytes=1 * GIB,
    gpus=(GPUReading(0, temperature_c=60.0, power_w=100.0, utilization_percent=50.0),),
)
IDLE = dataclasses.replace(ACTIVE, user_idle_s=3600.0)


def prefs_with(**overrides: str) -> Preferences:
    """Defaults plus dotted-key overrides (``active__cpu_percent="30"``), validated like flags."""
    flags = {key.replace("__", "."): value for key, value in overrides.items()}
    return load_preferences(Paths.under(Path("/nonexistent-volunteer-home")), overrides=flags, environ={})


# (id, preference overrides, readings, now, hardware, expected fields; "reason" matches a substring)
CASES: list[tuple[str, dict[str, str], Readings, datetime, HardwareProfile, dict[str, Any]]] = [
    # --- profiles and defaults
    ("defaults-active", {}, ACTIVE, MONDAY_NOON, PROFILE,
     {"run": True, "profile": "active", "threads": 4, "duty_cycle": 1.0, "use_gpu": False,
      "memory_budget_bytes": 8 * GIB, "cpu_cap_percent": 50.0, "upload_bps": None, "download_bps": None}),
    ("defaults-idle", {}, IDLE, MONDAY_NOON, PROFILE,
     {"run": True, "profile": "idle", "threads": 8, "duty_cycle": 1.0, "use_gpu": True,
      "memory_budget_bytes": int(0.9 * 16 * GIB), "cpu_cap_percent": 100.0}),
    # --- active.cpu_percent / idle.cpu_percent
    ("active-cpu-25", {"active__cpu_percent": "25"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"threads": 2, "duty_cycle": 1.0, "cpu_cap_percent": 25.0}),
    ("active-cpu-30", {"active__cpu_percent": "30"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"threads": 3, "duty_cycle": pytest.approx(0.8)}),
    ("active-cpu-5", {"active__cpu_percent": "5"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"threads": 1, "duty_cycle": pytest.approx(0.4)}),
    ("idle-cpu-60", {"idle__cpu_percent": "60"}, IDLE, MONDAY_NOON, PROFILE,
     {"threads": 5, "duty_cycle": pytest.approx(0.96), "cpu_cap_percent": 60.0}),
    # --- active.max_cores / idle.max_cores
    ("active-max-cores-1", {"active__max_cores": "1"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"threads": 1, "duty_cycle": 1.0}),
    ("idle-max-cores-2", {"idle__max_cores": "2"}, IDLE, MONDAY_NOON, PROFILE, {"threads": 2, "duty_cycle": 1.0}),
    ("idle-max-cores-above-machine", {"idle__max_cores": "64"}, IDLE, MONDAY_NOON, PROFILE, {"threads": 8}),
    # --- active.memory_percent / idle.memory_percent
    ("active-memory-cap-ok", {"active__memory_percent": "10"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"run": True, "memory_budget_bytes": int(1.6 * GIB)}),
    ("active-memory-cap-exceeded", {"active__memory_percent": "5"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"run": False, "reason": "memory", "duty_cycle": 0.0}),
    ("idle-memory-cap-exceeded", {"idle__memory_percent": "5"}, IDLE, MONDAY_NOON, PROFILE,
     {"run": False, "reason": "5% cap", "profile": "idle"}),
    # --- active.use_gpu / idle.use_gpu
    ("active-use-gpu", {"active__use_gpu": "true"}, ACTIVE, MONDAY_NOON, PROFILE, {"use_gpu": True}),
    ("idle-no-gpu", {"idle__use_gpu": "false"}, IDLE, MONDAY_NOON, PROFILE, {"use_gpu": False, "run": True}),
    ("gpu-wanted-but-none", {}, IDLE, MONDAY_NOON, NO_GPU, {"use_gpu": False, "run": True, "notes": ()}),
    # --- gpu_max_temp_c
    ("idle-gpu-too-hot", {"idle__gpu_max_temp_c": "55"}, IDLE, MONDAY_NOON, PROFILE,
     {"use_gpu": False, "run": True, "notes": ("GPU 0 at 60 C, above the 55 C cap",)}),
    ("active-gpu-too-hot", {"active__use_gpu": "yes", "active__gpu_max_temp_c": "59"}, ACTIVE, MONDAY_NOON,
     PROFILE, {"use_gpu": False}),
    ("gpu-temp-cap-off", {"idle__gpu_max_temp_c": "0"},
     dataclasses.replace(IDLE, gpus=(GPUReading(0, temperature_c=110.0),)), MONDAY_NOON, PROFILE, {"use_gpu": True}),
    ("gpu-temp-unknown", {"idle__gpu_max_temp_c": "30"}, dataclasses.replace(IDLE, gpus=()), MONDAY_NOON, PROFILE,
     {"use_gpu": True}),
    # --- gpu_max_power_w
    ("idle-gpu-power-cap", {"idle__gpu_max_power_w": "50"}, IDLE, MONDAY_NOON, PROFILE,
     {"use_gpu": False, "notes": ("GPU 0 draws 100 W, above the 50 W cap",)}),
    ("active-gpu-power-ok", {"active__use_gpu": "1", "active__gpu_max_power_w": "150"}, ACTIVE, MONDAY_NOON,
     PROFILE, {"use_gpu": True}),
    # --- compute.run_when_active
    ("run-only-when-idle-active", {"compute__run_when_active": "false"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"run": False, "reason": "user is active", "use_gpu": False, "duty_cycle": 0.0}),
    ("run-only-when-idle-idle", {"compute__run_when_active": "false"}, IDLE, MONDAY_NOON, PROFILE,
     {"run": True, "profile": "idle"}),
    # --- compute.idle_minutes
    ("idle-minutes-not-yet", {"compute__idle_minutes": "20"}, dataclasses.replace(ACTIVE, user_idle_s=600.0),
     MONDAY_NOON, PROFILE, {"profile": "active"}),
    ("idle-minutes-reached", {"compute__idle_minutes": "20"}, dataclasses.replace(ACTIVE, user_idle_s=1200.0),
     MONDAY_NOON, PROFILE, {"profile": "idle"}),
    ("idle-minutes-default-3", {}, dataclasses.replace(ACTIVE, user_idle_s=179.0), MONDAY_NOON, PROFILE,
     {"profile": "active"}),
    # --- compute.unknown_idle
    ("unknown-presence-strict", {}, dataclasses.replace(ACTIVE, user_idle_s=None), MONDAY_NOON, PROFILE,
     {"profile": "active", "run": True, "reason": "presence unknown"}),
    ("unknown-presence-idle", {"compute__unknown_idle": "idle"}, dataclasses.replace(ACTIVE, user_idle_s=None),
     MONDAY_NOON, PROFILE, {"profile": "idle"}),
    ("unknown-presence-only-idle", {"compute__run_when_active": "no"}, dataclasses.replace(ACTIVE, user_idle_s=None),
     MONDAY_NOON, PROFILE, {"run": False, "reason": "presence unknown"}),
    # --- compute.run_on_battery
    ("on-battery-paused", {}, dataclasses.replace(IDLE, on_battery=True), MONDAY_NOON, PROFILE,
     {"run": False, "reason": "on battery power"}),
    ("on-battery-allowed", {"compute__run_on_battery": "true"}, dataclasses.replace(IDLE, on_battery=True),
     MONDAY_NOON, PROFILE, {"run": True}),
    # --- compute.other_cpu_suspend_percent
    ("others-busy", {"compute__other_cpu_suspend_percent": "30"},
     dataclasses.replace(IDLE, cpu_percent_total=55.0, cpu_percent_ours=20.0), MONDAY_NOON, PROFILE,
     {"run": False, "reason": "other programs use 35% CPU (limit 30%)"}),
    ("others-below-limit", {"compute__other_cpu_suspend_percent": "30"},
     dataclasses.replace(IDLE, cpu_percent_total=90.0, cpu_percent_ours=70.0), MONDAY_NOON, PROFILE, {"run": True}),
    ("others-limit-off", {}, dataclasses.replace(IDLE, cpu_percent_total=100.0, cpu_percent_ours=0.0),
     MONDAY_NOON, PROFILE, {"run": True}),
    # --- compute.hours
    ("compute-hours-outside", {"compute__hours": "22:00-07:00"}, IDLE, MONDAY_NOON, PROFILE,
     {"run": False, "reason": "outside compute hours (22:00-07:00)"}),
    ("compute-hours-inside", {"compute__hours": "22:00-07:00"}, IDLE, MONDAY_2300, PROFILE, {"run": True}),
    ("compute-hours-weekend-only", {"compute__hours": "sat,sun 00:00-24:00"}, IDLE, MONDAY_NOON, PROFILE,
     {"run": False}),
    # --- network.upload_mbps / download_mbps
    ("upload-cap", {"network__upload_mbps": "8"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"upload_bps": 1e6, "download_bps": None}),
    ("download-cap", {"network__download_mbps": "80"}, ACTIVE, MONDAY_NOON, PROFILE,
     {"upload_bps": None, "download_bps": 1e7}),
    # --- network.daily_transfer_mb
    ("daily-cap-reached", {"network__daily_transfer_mb": "100", "network__upload_mbps": "8"},
     dataclasses.replace(IDLE, transfer_today_bytes=100_000_000), MONDAY_NOON, PROFILE,
     {"run": True, "upload_bps": 0.0, "download_bps": 0.0, "notes": ("daily transfer cap of 100 MB reached",)}),
    ("daily-cap-not-reached", {"network__daily_transfer_mb": "100"},
     dataclasses.replace(IDLE, transfer_today_bytes=99_999_999), MONDAY_NOON, PROFILE, {"upload_bps": None}),
    # --- network.hours
    ("network-hours-outside", {"network__hours": "01:00-05:00"}, IDLE, MONDAY_NOON, PROFILE,
     {"run": True, "upload_bps": 0.0, "download_bps": 0.0, "notes": ("network outside its hours (01:00-05:00)",)}),
    ("network-hours-inside", {"network__hours": "mon 11:00-13:00", "network__download_mbps": "8"}, IDLE,
     MONDAY_NOON, PROFILE, {"download_bps": 1e6}),
    # --- precedence: battery before hours before user activity
    ("precedence", {"compute__hours": "01:00-02:00", "compute__run_when_active": "false"},
     dataclasses.replace(ACTIVE, on_battery=True), MONDAY_NOON, PROFILE, {"reason": "on battery power"}),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "readings", "now", "hardware", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_decision_table(
    overrides: dict[str, str],
    readings: Readings,
    now: datetime,
    hardware: HardwareProfile,
    expected: dict[str, Any],
) -> None:
    decision = decide(hardware, readings, prefs_with(**overrides), now)
    for name, want in expected.items():
        got = getattr(decision, name)
        if name == "reason":
            assert want in got, (got, want)
        else:
            assert got == want, (name, got, want)


def test_table_covers_every_preference() -> None:
    covered = {key.replace("__", ".") for case in CASES for key in case[1]}
    # A field counts as covered by its section-less name in either profile.
    names = {key.split(".", 1)[1] if key.split(".")[0] in ("active", "idle") else key for key in covered}
    for info in describe_fields():
        section, name = info.key.split(".", 1)
        assert (name if section in ("active", "idle") else info.key) in names, f"no table row for {info.key}"


def test_decide_is_pure_and_round_trips() -> None:
    prefs = Preferences()
    first = decide(PROFILE, ACTIVE, prefs, MONDAY_NOON)
    assert decide(PROFILE, ACTIVE, prefs, MONDAY_NOON) == first
    assert ThrottleDecision.from_dict(first.to_dict()) == first
    assert Readings.from_dict(IDLE.to_dict()) == IDLE


@given(cap=st.floats(1, 100), logical=st.integers(1, 256), max_cores=st.integers(0, 300))
def test_cpu_plan_meets_the_cap(cap: float, logical: int, max_cores: int) -> None:
    threads, duty = cpu_plan(cap, logical, max_cores)
    assert 1 <= threads <= logical
    if max_cores:
        assert threads <= max_cores
    assert 0 < duty <= 1
    share = threads * duty / logical * 100
    assert share <= cap + 1e-6
    if max_cores == 0 or max_cores * 100 / logical >= cap:
        assert math.isclose(share, cap, rel_tol=1e-9)
