"""Computing preferences: a tree of frozen dataclasses read from TOML, environment variables and flags.

The set follows BOINC's computing preferences (CPU usage limit, max cores, suspend while other programs are
busy, run only after the user has been idle, run on battery, daily time windows for compute and network,
memory caps, transfer caps, GPU use while the user is active) and adds what its users have long asked for:
a GPU temperature cap, a GPU power cap and two full usage profiles, ``active`` (someone is at the keyboard)
and ``idle`` (nobody is).

Precedence, lowest first: built-in defaults, ``config.toml`` in the config directory, environment variables
``VOLUNTEER_<SECTION>_<KEY>`` (``VOLUNTEER_ACTIVE_CPU_PERCENT=30``), then command-line overrides given as
dotted keys (``active.cpu_percent``). Every value is validated; an invalid one raises :class:`ConfigError`
naming the key, the bad value and the allowed range. A corrupt file is never overwritten with defaults.

CPU percentages are percent of the *whole machine* (all logical cores together), as in BOINC: 50 on an
8-core machine means the client may keep four cores busy, or all eight half of the time.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import os
import re
import tempfile
import textwrap
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import tomlkit

from volunteer.errors import ConfigError
from volunteer.paths import Paths

CONFIG_FILE_NAME = "config.toml"
ENV_PREFIX = "VOLUNTEER_"


def _pref(
    default: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    unit: str = "",
) -> Any:
    """A preference field: default plus the allowed range (numbers) or choices (strings)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "unit": unit})


@dataclass(frozen=True, slots=True)
class UsageProfile:
    """Resource limits for one situation: the user is at the machine (``active``) or away (``idle``)."""

    cpu_percent: float = _pref(50.0, lo=1, hi=100, unit="percent of the whole machine")
    """Most CPU time the client may use, in percent of the whole machine (all logical cores together)."""
    max_cores: int = _pref(0, lo=0, hi=4096, unit="cores, 0 = all")
    """Most CPU cores (compute threads) the client may use; 0 means all logical cores."""
    memory_percent: float = _pref(50.0, lo=1, hi=100, unit="percent of physical RAM")
    """Most memory the client may hold, in percent of physical RAM."""
    use_gpu: bool = _pref(False)
    """Whether the client may compute on GPUs in this situation."""
    gpu_max_temp_c: float = _pref(80.0, lo=0, hi=120, unit="degrees Celsius, 0 = no cap")
    """Stop using a GPU while its temperature is above this (needs NVML); 0 means no cap."""
    gpu_max_power_w: float = _pref(0.0, lo=0, hi=5000, unit="watts, 0 = no cap")
    """Stop using a GPU while it draws more power than this (needs NVML); 0 means no cap."""


def _idle_profile() -> UsageProfile:
    return UsageProfile(cpu_percent=100.0, memory_percent=90.0, use_gpu=True, gpu_max_temp_c=85.0)


@dataclass(frozen=True, slots=True)
class ComputePrefs:
    """When the client may compute at all."""

    run_when_active: bool = _pref(True)
    """Compute while the user is active (under the ``active`` limits); false runs only after ``idle_minutes``."""
    idle_minutes: float = _pref(3.0, lo=0, hi=1440, unit="minutes")
    """The user counts as active until there has been no keyboard or mouse input for this many minutes."""
    unknown_idle: str = _pref("active", choices=("active", "idle"))
    """How to treat the user when idle time cannot be read (no display, unsupported OS): the stricter
    ``active`` by default; ``idle`` suits headless servers and containers."""
    run_on_battery: bool = _pref(False)
    """Compute while the computer runs on battery."""
    other_cpu_suspend_percent: float = _pref(0.0, lo=0, hi=100, unit="percent of the whole machine, 0 = never")
    """Suspend while other programs use more than this much CPU; 0 never suspends for this."""
    hours: tuple[str, ...] = _pref((), unit='windows like "22:00-07:00" or "mon-fri 09:00-17:00"; empty = always')
    """Daily time windows in which the client may compute (local time); empty means always."""


@dataclass(frozen=True, slots=True)
class NetworkPrefs:
    """How much the client may use the network, and when."""

    upload_mbps: float = _pref(0.0, lo=0, hi=1_000_000, unit="megabits per second, 0 = unlimited")
    """Upload rate cap in megabits per second; 0 means unlimited."""
    download_mbps: float = _pref(0.0, lo=0, hi=1_000_000, unit="megabits per second, 0 = unlimited")
    """Download rate cap in megabits per second; 0 means unlimited."""
    daily_transfer_mb: float = _pref(0.0, lo=0, hi=1e9, unit="megabytes per day, 0 = unlimited")
    """Most bytes up and down together per local calendar day, in megabytes; 0 means unlimited."""
    hours: tuple[str, ...] = _pref((), unit='windows like "22:00-07:00" or "mon-fri 09:00-17:00"; empty = always')
    """Daily time windows in which the client may use the network (local time); empty means always."""


@dataclass(frozen=True, slots=True)
class Preferences:
    """All computing preferences; each TOML section is one field."""

    compute: ComputePrefs = field(default_factory=ComputePrefs)
    """When the client may compute at all."""
    network: NetworkPrefs = field(default_factory=NetworkPrefs)
    """Bandwidth caps, transfer cap and network hours."""
    active: UsageProfile = field(default_factory=UsageProfile)
    """Limits while the user is at the machine."""
    idle: UsageProfile = field(default_factory=_idle_profile)
    """Limits while the user is away."""


SECTIONS: dict[str, type[Any]] = {
    "compute": ComputePrefs,
    "network": NetworkPrefs,
    "active": UsageProfile,
    "idle": UsageProfile,
}


# ---------------------------------------------------------------------------------------------- time windows

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW_RE = re.compile(
    r"^\s*(?:(?P<days>[a-z]{3}(?:-[a-z]{3})?(?:,[a-z]{3}(?:-[a-z]{3})?)*)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """A daily window of local time, optionally on some weekdays only; it may wrap past midnight."""

    days: frozenset[int]
    """Weekdays (Monday = 0) on which the window *starts*."""
    start_min: int
    """Start, in minutes after midnight (inclusive)."""
    end_min: int
    """End, in minutes after midnight (exclusive); less than or equal to ``start_min`` wraps past midnight."""

    def contains(self, now: datetime) -> bool:
        """Whether the local time ``now`` lies inside the window."""
        minute = now.hour * 60 + now.minute
        day = now.weekday()
        if self.start_min < self.end_min:
            return day in self.days and self.start_min <= minute < self.end_min
        # Wraps midnight: the late part belongs to today's window, the early part to yesterday's.
        if minute >= self.start_min:
            return day in self.days
        return minute < self.end_min and (day - 1) % 7 in self.days


def _parse_clock(text: str) -> int:
    hours, minutes = (int(part) for part in text.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or (hours == 24 and minutes):
        raise ValueError(text)
    return hours * 60 + minutes


def parse_window(text: str) -> TimeWindow:
    """Parse ``"HH:MM-HH:MM"`` with an optional weekday prefix (``"mon-fri 09:00-17:00"``, ``"sat,sun ..."``)."""
    match = _WINDOW_RE.match(text.lower())
    if match is None:
        raise ValueError(f"not a time window: {text!r}")
    days: set[int] = set()
    if match["days"]:
        for part in match["days"].split(","):
            first, _, last = part.partition("-")
            if first not in _DAYS or (last and last not in _DAYS):
                raise ValueError(f"unknown weekday in {text!r}")
            lo, hi = _DAYS.index(first), _DAYS.index(last or first)
            day = lo
            days.add(day)
            while day != hi:
                day = (day + 1) % 7
                days.add(day)
    else:
        days = set(range(7))
    try:
        start, end = _parse_clock(match["start"]), _parse_clock(match["end"])
    except ValueError:
        raise ValueError(f"not a valid time of day in {text!r}") from None
    if start == end:
        raise ValueError(f"empty time window {text!r}")
    return TimeWindow(frozenset(days), start % 1440, end % 1440 if end != 1440 else 1440)


def in_windows(windows: tuple[str, ...], now: datetime) -> bool:
    """Whether ``now`` is inside any of ``windows`` (already validated); no windows means always."""
    return not windows or any(parse_window(w).contains(now) for w in windows)


# ---------------------------------------------------------------------------------------------- field metadata


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One preference as the CLI and the dashboard describe it."""

    key: str
    """Dotted key, ``section.name``."""
    kind: type[Any]
    """``bool``, ``int``, ``float``, ``str`` or ``tuple`` (a list of strings)."""
    default: Any
    """The built-in default."""
    lo: float | None
    """Smallest allowed number, if numeric."""
    hi: float | None
    """Largest allowed number, if numeric."""
    choices: tuple[str, ...] | None
    """Allowed strings, if a choice."""
    unit: str
    """Unit and special values, for humans."""
    help: str
    """The field's docstring."""

    def allowed(self) -> str:
        """The allowed values in words."""
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            return " or ".join(repr(c) for c in self.choices)
        if self.kind is tuple:
            return 'a list of time windows such as "22:00-07:00" or "mon-fri 09:00-17:00"'
        whole = "a whole number" if self.kind is int else "a number"
        text = f"{whole} from {_fmt_num(self.lo)} to {_fmt_num(self.hi)}"
        return f"{text} ({self.unit})" if self.unit else text


def _fmt_num(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else str(value)


def _field_docs(cls: type[Any]) -> dict[str, str]:
    """Attribute docstrings (the string right after each annotated field) read from the class source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _kind(annotation: Any) -> type[Any]:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return tuple
    if annotation in (bool, int, float, str):
        return typing.cast(type[Any], annotation)
    raise TypeError(f"unsupported preference type {annotation!r}")


def describe_fields() -> list[FieldInfo]:
    """Every preference with its type, default, allowed range and help, in file order."""
    return list(_described())


@functools.cache
def _described() -> tuple[FieldInfo, ...]:
    # Cached: the classes never change, and reading docstrings from source is not free.
    defaults = Preferences()
    infos: list[FieldInfo] = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        section_default = getattr(defaults, section)
        for f in dataclasses.fields(cls):
            infos.append(
                FieldInfo(
                    key=f"{section}.{f.name}",
                    kind=_kind(hints[f.name]),
                    default=getattr(section_default, f.name),
                    lo=f.metadata.get("lo"),
                    hi=f.metadata.get("hi"),
                    choices=f.metadata.get("choices"),
                    unit=f.metadata.get("unit", ""),
                    help=docs.get(f.name, ""),
                )
            )
    return tuple(infos)


def _field_index() -> dict[str, FieldInfo]:
    return {info.key: info for info in _described()}


# ---------------------------------------------------------------------------------------------- validation


def _bad(info: FieldInfo, value: object, where: str = "") -> ConfigError:
    suffix = f" ({where})" if where else ""
    return ConfigError(f"{info.key} = {value!r} is not allowed{suffix}: allowed is {info.allowed()}")


def _check(info: FieldInfo, value: Any, where: str = "") -> Any:
    """Validate an already-typed value (from TOML or from :func:`_parse_text`) and normalise it."""
    if info.kind is bool:
        if not isinstance(value, bool):
            raise _bad(info, value, where)
        return value
    if info.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(info, value, where)
        if info.kind is int and not float(value).is_integer():
            raise _bad(info, value, where)
        if not math.isfinite(value):
            raise _bad(info, value, where)
        if (info.lo is not None and value < info.lo) or (info.hi is not None and value > info.hi):
            raise _bad(info, value, where)
        return int(value) if info.kind is int else float(value)
    if info.kind is str:
        if not isinstance(value, str) or (info.choices is not None and value not in info.choices):
            raise _bad(info, value, where)
        return value
    # A list of time windows.
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise _bad(info, value, where)
    for item in value:
        try:
            parse_window(item)
        except ValueError as exc:
            raise ConfigError(
                f"{info.key}: {exc}{f' ({where})' if where else ''}; allowed is {info.allowed()}"
            ) from None
    return tuple(value)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _parse_text(info: FieldInfo, text: str, where: str = "") -> Any:
    """Turn a command-line or environment string into a validated value."""
    raw = text.strip()
    value: Any
    if info.kind is bool:
        low = raw.lower()
        if low not in _TRUE | _FALSE:
            raise _bad(info, text, where)
        value = low in _TRUE
    elif info.kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise _bad(info, text, where) from None
    elif info.kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise _bad(info, text, where) from None
    elif info.kind is str:
        value = raw
    elif raw.startswith("["):
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            raise _bad(info, text, where) from None
    else:
        value = _split_windows(raw)
    return _check(info, value, where)


def _split_windows(raw: str) -> list[str]:
    """Split ``"mon-fri 09:00-17:00, sat,sun 10:00-12:00"`` into windows: a piece without a time of day is
    a weekday list that continues into the next piece."""
    windows: list[str] = []
    pending = ""
    for piece in re.split(r"[,;]", raw):
        pending = f"{pending},{piece.strip()}" if pending else piece.strip()
        if any(ch.isdigit() for ch in piece):
            windows.append(pending)
            pending = ""
    if pending:
        windows.append(pending)
    return [w for w in windows if w]


def _line_of(text: str, section: str, key: str) -> int | None:
    """Best-effort line number of ``key`` inside ``[section]`` for error messages."""
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_-]+)\s*\]", stripped)
        if header:
            current = header[1]
        elif current == section and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _apply(base: Preferences, values: Mapping[str, Any]) -> Preferences:
    """A copy of ``base`` with validated dotted-key ``values`` replaced."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        by_section.setdefault(section, {})[name] = value
    changes = {section: dataclasses.replace(getattr(base, section), **fields) for section, fields in by_section.items()}
    return dataclasses.replace(base, **changes)


def _unknown_key(key: str, where: str) -> ConfigError:
    section = key.partition(".")[0]
    if section in SECTIONS:
        names = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
        return ConfigError(f"unknown preference {key!r} ({where}); [{section}] has: {names}")
    return ConfigError(f"unknown preference section {section!r} ({where}); sections are: {', '.join(SECTIONS)}")


# ---------------------------------------------------------------------------------------------- reading


def config_file(paths: Paths) -> Path:
    """The preferences file."""
    return paths.config_dir / CONFIG_FILE_NAME


def _read_file_values(path: Path) -> dict[str, Any]:
    """Validated dotted-key values from the TOML file (empty if there is no file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read preferences file {path}: {exc}") from exc
    return _values_from_text(text, str(path))


def _values_from_text(text: str, source: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)".
        raise ConfigError(
            f"preferences file {source} is not valid TOML: {exc}. Fix or delete it "
            "(`volunteer config reset` writes fresh defaults and keeps a backup)."
        ) from exc
    index = _field_index()
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise _unknown_key(f"{section}.", f"in {source}")
        for name, raw in table.items():
            key = f"{section}.{name}"
            line = _line_of(text, section, name)
            where = f"{source}, line {line}" if line else source
            if key not in index:
                raise _unknown_key(key, where)
            values[key] = _check(index[key], raw, where)
    return values


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Validated dotted-key values from ``VOLUNTEER_<SECTION>_<KEY>`` environment variables."""
    index = _field_index()
    values: dict[str, Any] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        section, _, name = var[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS:
            continue  # VOLUNTEER_HOME and friends belong to other parts.
        key = f"{section}.{name}"
        if key not in index:
            raise _unknown_key(key, f"environment variable {var}")
        values[key] = _parse_text(index[key], text, f"environment variable {var}")
    return values


def parse_overrides(overrides: Mapping[str, str]) -> dict[str, Any]:
    """Validated values from dotted-key flags (``{"active.cpu_percent": "30"}``)."""
    index = _field_index()
    values: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in index:
            raise _unknown_key(key, "command line")
        values[key] = _parse_text(index[key], text, "command line")
    return values


def load_preferences(
    paths: Paths,
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Preferences:
    """Defaults, then ``config.toml``, then ``VOLUNTEER_<SECTION>_<KEY>`` variables, then ``overrides``.

    Raises :class:`ConfigError` for a corrupt file (naming the line), unknown keys, and invalid values
    (naming the key, the value and the allowed range). Never writes anything.
    """
    prefs = _apply(Preferences(), _read_file_values(config_file(paths)))
    prefs = _apply(prefs, env_values(os.environ if environ is None else environ))
    return _apply(prefs, parse_overrides(overrides or {}))


def load_file_preferences(paths: Paths) -> Preferences:
    """Defaults plus ``config.toml`` only (what ``config set`` edits)."""
    return _apply(Preferences(), _read_file_values(config_file(paths)))


def preferences_to_dict(prefs: Preferences) -> dict[str, dict[str, Any]]:
    """Plain nested dict (lists for windows), for JSON, TOML and status snapshots."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        part = dataclasses.asdict(getattr(prefs, section))
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in part.items()}
    return out


def preferences_from_dict(data: Mapping[str, Any]) -> Preferences:
    """Inverse of :func:`preferences_to_dict`, validating every value (for data received from elsewhere)."""
    index = _field_index()
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, Mapping):
            raise _unknown_key(f"{section}.", "preferences dict")
        for name, raw in table.items():
            key = f"{section}.{name}"
            if key not in index:
                raise _unknown_key(key, "preferences dict")
            values[key] = _check(index[key], raw)
    return _apply(Preferences(), values)


# ---------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def default_document(prefs: Preferences | None = None) -> str:
    """A commented TOML document holding ``prefs`` (defaults if omitted), each key explained."""
    prefs = prefs or Preferences()
    doc = tomlkit.document()
    doc.add(tomlkit.comment("volunteer computing preferences. `volunteer config show` lists every key."))
    doc.add(tomlkit.comment("CPU percentages are percent of the whole machine (all logical cores together)."))
    infos = describe_fields()
    for section, cls in SECTIONS.items():
        table = tomlkit.table()
        table.comment((cls.__doc__ or "").strip().splitlines()[0])
        for info in infos:
            if not info.key.startswith(f"{section}."):
                continue
            name = info.key.partition(".")[2]
            for line in textwrap.wrap(f"{info.help} Allowed: {info.allowed()}.", 110):
                table.add(tomlkit.comment(line))
            table.add(name, _toml_value(getattr(getattr(prefs, section), name)))
        doc.add(tomlkit.nl())
        doc.add(section, table)
    return tomlkit.dumps(doc)


def set_preference(paths: Paths, dotted_key: str, text_value: str) -> Preferences:
    """Validate ``text_value`` for ``dotted_key`` and write it into ``config.toml`` atomically.

    Comments and layout of an existing file are kept. A corrupt or invalid file raises :class:`ConfigError`
    and is left untouched. Returns the preferences the file now holds.
    """
    index = _field_index()
    if dotted_key not in index:
        raise _unknown_key(dotted_key, "config set")
    value = _parse_text(index[dotted_key], text_value)
    path = config_file(paths)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = default_document()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read preferences file {path}: {exc}") from exc
    current = _values_from_text(text, str(path))  # refuses a corrupt file before anything is written
    doc = tomlkit.parse(text)
    section, _, name = dotted_key.partition(".")
    if section not in doc:
        doc.add(section, tomlkit.table())
    table = doc[section]
    assert isinstance(table, dict)
    table[name] = _toml_value(value)
    new_text = tomlkit.dumps(doc)
    current[dotted_key] = value
    _atomic_write(path, new_text)
    return _apply(Preferences(), current)


def reset_preferences(paths: Paths) -> Path | None:
    """Write a fresh commented defaults file; an existing file is kept as ``config.toml.bak``.

    Returns the backup path, if one was made.
    """
    path = config_file(paths)
    backup: Path | None = None
    if path.exists():
        backup = path.with_name(CONFIG_FILE_NAME + ".bak")
        os.replace(path, backup)
    _atomic_write(path, default_document())
    return backup


def validate_file(path: Path) -> Preferences:
    """Parse and validate a preferences file (e.g. a draft from ``config edit``) without applying env or flags."""
    return _apply(Preferences(), _read_file_values(path))


def install_file(paths: Paths, draft: Path) -> Preferences:
    """Validate ``draft`` and, only if it is valid, atomically make it the preferences file."""
    prefs = validate_file(draft)
    _atomic_write(config_file(paths), draft.read_text(encoding="utf-8"))
    return prefs
