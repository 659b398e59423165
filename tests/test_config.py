"""Preferences: defaults, TOML file, env vars, flags, validation, atomic writes, corrupt files."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from volunteer.cli import app
from volunteer.config import (
    Preferences,
    config_file,
    describe_fields,
    in_windows,
    install_file,
    load_preferences,
    parse_window,
    preferences_from_dict,
    preferences_to_dict,
    reset_preferences,
    set_preference,
)
from volunteer.errors import ConfigError
from volunteer.paths import Paths


@pytest.fixture
def paths(isolated_home: Path) -> Paths:
    return Paths.under(isolated_home)


def test_defaults_without_file(paths: Paths) -> None:
    prefs = load_preferences(paths, environ={})
    assert prefs == Preferences()
    assert prefs.active.cpu_percent == 50.0
    assert prefs.idle.use_gpu is True
    assert not config_file(paths).exists()  # loading never writes


def test_every_field_has_help_and_allowed_range() -> None:
    infos = describe_fields()
    assert len(infos) == 4 + 6 + 6 + 6
    for info in infos:
        assert info.help, info.key
        assert info.allowed()


def test_file_then_env_then_flags(paths: Paths) -> None:
    config_file(paths).parent.mkdir(parents=True)
    config_file(paths).write_text('[active]\ncpu_percent = 30\nmax_cores = 2\n[compute]\nhours = ["22:00-07:00"]\n')
    prefs = load_preferences(paths, environ={})
    assert prefs.active.cpu_percent == 30.0
    assert prefs.active.max_cores == 2
    assert prefs.compute.hours == ("22:00-07:00",)
    env = {"VOLUNTEER_ACTIVE_CPU_PERCENT": "40", "VOLUNTEER_HOME": "/elsewhere", "VOLUNTEER_IDLE_USE_GPU": "no"}
    prefs = load_preferences(paths, environ=env)
    assert prefs.active.cpu_percent == 40.0
    assert prefs.idle.use_gpu is False
    assert prefs.active.max_cores == 2
    prefs = load_preferences(paths, overrides={"active.cpu_percent": "25"}, environ=env)
    assert prefs.active.cpu_percent == 25.0


def test_corrupt_file_names_the_line_and_is_not_overwritten(paths: Paths) -> None:
    path = config_file(paths)
    path.parent.mkdir(parents=True)
    broken = "[active]\ncpu_percent = 30\nmax_cores = = 2\n"
    path.write_text(broken)
    with pytest.raises(ConfigError, match=r"line 3"):
        load_preferences(paths, environ={})
    with pytest.raises(ConfigError, match=r"line 3"):
        set_preference(paths, "active.cpu_percent", "20")
    assert path.read_text() == broken


def test_out_of_range_in_file_names_key_line_and_range(paths: Paths) -> None:
    path = config_file(paths)
    path.parent.mkdir(parents=True)
    path.write_text("# my prefs\n[idle]\nuse_gpu = true\ncpu_percent = 150\n")
    with pytest.raises(ConfigError) as info:
        load_preferences(paths, environ={})
    message = str(info.value)
    assert "idle.cpu_percent" in message
    assert "150" in message
    assert "line 4" in message
    assert "from 1 to 100" in message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("active.cpu_percent", "0", "from 1 to 100"),
        ("active.cpu_percent", "101", "from 1 to 100"),
        ("active.cpu_percent", "lots", "from 1 to 100"),
        ("active.cpu_percent", "nan", "from 1 to 100"),
        ("idle.max_cores", "1.5", "whole number from 0 to 4096"),
        ("idle.max_cores", "-1", "whole number from 0 to 4096"),
        ("active.memory_percent", "0", "from 1 to 100"),
        ("active.use_gpu", "maybe", "true or false"),
        ("idle.gpu_max_temp_c", "130", "from 0 to 120"),
        ("idle.gpu_max_power_w", "-5", "from 0 to 5000"),
        ("compute.idle_minutes", "-1", "from 0 to 1440"),
        ("compute.unknown_idle", "sometimes", "'active' or 'idle'"),
        ("compute.other_cpu_suspend_percent", "120", "from 0 to 100"),
        ("compute.run_on_battery", "2", "true or false"),
        ("compute.hours", "25:00-26:00", "time window"),
        ("network.hours", "9-17", "time window"),
        ("network.upload_mbps", "-1", "megabits per second"),
        ("network.daily_transfer_mb", "x", "megabytes per day"),
    ],
)
def test_set_rejects_invalid_values_with_allowed_range(paths: Paths, key: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        set_preference(paths, key, value)
    assert key in str(info.value)
    assert fragment in str(info.value)
    assert not config_file(paths).exists()


def test_unknown_keys_are_rejected(paths: Paths) -> None:
    with pytest.raises(ConfigError, match="has: cpu_percent"):
        set_preference(paths, "active.cpu", "3")
    with pytest.raises(ConfigError, match="sections are"):
        set_preference(paths, "gpu.cap", "3")
    with pytest.raises(ConfigError, match="VOLUNTEER_ACTIVE_CPU"):
        load_preferences(paths, environ={"VOLUNTEER_ACTIVE_CPU": "3"})
    with pytest.raises(ConfigError, match="VOLUNTEER_IDLE_CPU_PERCENT"):
        load_preferences(paths, environ={"VOLUNTEER_IDLE_CPU_PERCENT": "500"})


def test_set_writes_atomically_and_keeps_comments(paths: Paths) -> None:
    path = config_file(paths)
    path.parent.mkdir(parents=True)
    path.write_text("# keep me\n[active]\ncpu_percent = 30 # thirty\n")
    prefs = set_preference(paths, "active.max_cores", "4")
    assert prefs.active.max_cores == 4
    assert prefs.active.cpu_percent == 30.0
    prefs = set_preference(paths, "network.hours", "mon-fri 22:00-07:00, sat,sun 00:00-24:00")
    assert prefs.network.hours == ("mon-fri 22:00-07:00", "sat,sun 00:00-24:00")
    text = path.read_text()
    assert "# keep me" in text
    assert "# thirty" in text
    assert load_preferences(paths, environ={}) == prefs
    assert [p.name for p in path.parent.iterdir()] == ["config.toml"]  # no temp files left behind


def test_set_on_fresh_install_writes_commented_defaults(paths: Paths) -> None:
    prefs = set_preference(paths, "compute.run_on_battery", "yes")
    assert prefs.compute.run_on_battery is True
    text = config_file(paths).read_text()
    assert "Compute while the computer runs on battery" in text
    assert load_preferences(paths, environ={}) == prefs


def test_reset_keeps_a_backup(paths: Paths) -> None:
    set_preference(paths, "active.cpu_percent", "10")
    backup = reset_preferences(paths)
    assert backup is not None
    assert "cpu_percent = 10" in backup.read_text()
    assert load_preferences(paths, environ={}) == Preferences()


def test_install_file_refuses_invalid_draft(paths: Paths, tmp_path: Path) -> None:
    set_preference(paths, "active.cpu_percent", "10")
    before = config_file(paths).read_text()
    draft = tmp_path / "draft.toml"
    draft.write_text("[active]\ncpu_percent = 1000\n")
    with pytest.raises(ConfigError, match="line 2"):
        install_file(paths, draft)
    assert config_file(paths).read_text() == before
    draft.write_text("[active]\ncpu_percent = 20\n")
    assert install_file(paths, draft).active.cpu_percent == 20.0


def test_dict_round_trip_validates() -> None:
    prefs = load_preferences(Paths.under(Path("/nonexistent")), overrides={"idle.max_cores": "3"}, environ={})
    assert preferences_from_dict(preferences_to_dict(prefs)) == prefs
    with pytest.raises(ConfigError):
        preferences_from_dict({"active": {"cpu_percent": 0}})


@pytest.mark.parametrize(
    ("window", "when", "inside"),
    [
        ("09:00-17:00", datetime(2024, 5, 6, 9, 0), True),
        ("09:00-17:00", datetime(2024, 5, 6, 17, 0), False),
        ("22:00-07:00", datetime(2024, 5, 6, 23, 30), True),
        ("22:00-07:00", datetime(2024, 5, 6, 6, 59), True),
        ("22:00-07:00", datetime(2024, 5, 6, 12, 0), False),
        ("mon-fri 09:00-17:00", datetime(2024, 5, 11, 10, 0), False),  # Saturday
        ("mon-fri 09:00-17:00", datetime(2024, 5, 10, 10, 0), True),  # Friday
        ("fri 22:00-02:00", datetime(2024, 5, 11, 1, 0), True),  # Saturday early belongs to Friday's window
        ("sat 22:00-02:00", datetime(2024, 5, 11, 1, 0), False),
        ("sat,sun 00:00-24:00", datetime(2024, 5, 12, 23, 59), True),
        ("fri-mon 10:00-11:00", datetime(2024, 5, 13, 10, 30), True),  # wraps the week: Monday
        ("fri-mon 10:00-11:00", datetime(2024, 5, 14, 10, 30), False),  # Tuesday
    ],
)
def test_time_windows(window: str, when: datetime, inside: bool) -> None:
    assert parse_window(window).contains(when) is inside


@pytest.mark.parametrize("text", ["", "9-17", "10:00-10:00", "xyz 09:00-10:00", "24:30-01:00", "09:60-10:00"])
def test_bad_windows(text: str) -> None:
    with pytest.raises(ValueError, match=r"window|weekday|time of day"):
        parse_window(text)


@given(st.integers(0, 1439), st.integers(0, 1439), st.integers(0, 6 * 1440))
def test_window_and_its_complement_partition_the_day(start: int, end: int, minute_of_week: int) -> None:
    if start == end:
        return
    fmt = "{:02d}:{:02d}"
    a = f"{fmt.format(*divmod(start, 60))}-{fmt.format(*divmod(end, 60))}"
    b = f"{fmt.format(*divmod(end, 60))}-{fmt.format(*divmod(start, 60))}"
    day, minute = divmod(minute_of_week, 1440)
    when = datetime(2024, 5, 6 + day, *divmod(minute, 60))
    assert in_windows((a,), when) != in_windows((b,), when)


# ---------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_config_set_show_reset(paths: Paths) -> None:
    result = runner.invoke(app, ["config", "set", "active.cpu_percent", "30"])
    assert result.exit_code == 0, result.output
    assert "active.cpu_percent = 30" in result.output
    shown = json.loads(runner.invoke(app, ["config", "show", "--json"]).output)
    assert shown["active"]["cpu_percent"] == 30.0
    table = runner.invoke(app, ["config", "show"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "active.cpu_percent" in table.output
    result = runner.invoke(app, ["config", "reset", "--yes"])
    assert result.exit_code == 0
    assert "config.toml.bak" in result.output
    assert json.loads(runner.invoke(app, ["config", "show", "--json"]).output)["active"]["cpu_percent"] == 50.0


def test_cli_config_set_out_of_range(paths: Paths) -> None:
    result = runner.invoke(app, ["config", "set", "idle.cpu_percent", "250"])
    assert result.exit_code == 1
    assert "idle.cpu_percent" in result.output
    assert "from 1 to 100" in result.output


def test_cli_config_show_corrupt_file(paths: Paths) -> None:
    config_file(paths).parent.mkdir(parents=True)
    config_file(paths).write_text("[active\n")
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 1
    assert "line 1" in result.output
    assert config_file(paths).read_text() == "[active\n"


def test_cli_config_env_overrides_file(paths: Paths) -> None:
    runner.invoke(app, ["config", "set", "active.cpu_percent", "30"])
    result = runner.invoke(app, ["config", "show", "--json"], env={"VOLUNTEER_ACTIVE_CPU_PERCENT": "20"})
    assert json.loads(result.output)["active"]["cpu_percent"] == 20.0


def test_cli_config_edit_installs_only_valid_edits(paths: Paths) -> None:
    good = "sed -i 's/^cpu_percent = 50.0/cpu_percent = 20.0/'"
    result = runner.invoke(app, ["config", "edit"], env={"EDITOR": good, "VISUAL": good})
    assert result.exit_code == 0, result.output
    assert load_preferences(paths, environ={}).active.cpu_percent == 20.0
    before = config_file(paths).read_text()
    bad = "sed -i 's/^cpu_percent = 20.0/cpu_percent = 500/'"
    result = runner.invoke(app, ["config", "edit"], env={"EDITOR": bad, "VISUAL": bad})
    assert result.exit_code == 1
    assert "active.cpu_percent" in result.output
    assert "not changed" in result.output
    assert config_file(paths).read_text() == before


def test_cli_info_json_and_table(paths: Paths) -> None:
    result = runner.invoke(app, ["info", "--json", "--no-bench"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["cpu"]["logical_cores"] >= 1
    assert data["benchmarks"] == []
    table = runner.invoke(app, ["info", "--no-bench"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "Cores" in table.output
    assert "Memory" in table.output
