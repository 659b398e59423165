"""The ``t`` modal: edit the throttle preferences, validated by :mod:`volunteer.config` and saved to ``config.toml``."""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from volunteer.config import (
    FieldInfo,
    Preferences,
    describe_fields,
    load_file_preferences,
    parse_overrides,
    preferences_to_dict,
    set_preference,
)
from volunteer.errors import ConfigError
from volunteer.paths import Paths


def value_text(value: Any) -> str:
    """How a preference value is written in the form (the inverse of the config module's text parsing)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def input_id(key: str) -> str:
    """The widget id of a preference's input (ids cannot contain dots)."""
    return "pref-" + key.replace(".", "--")


class PreferencesScreen(ModalScreen[Preferences | None]):
    """A form with one input per preference. Save validates every changed value first, then writes them.

    Dismisses with the saved :class:`Preferences`, or ``None`` when cancelled. Invalid input keeps the form
    open with the config module's message (key, bad value, allowed range); nothing is written then.
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    DEFAULT_CSS = """
    PreferencesScreen { align: center middle; }
    #prefs-dialog { width: 114; height: 90%; border: thick $accent; background: $surface; padding: 0 1; }
    #prefs-title { text-style: bold; height: 1; }
    #prefs-fields { height: 1fr; }
    .pref-row { height: 3; }
    .pref-key { width: 34; padding: 1 1 0 0; }
    .pref-input { width: 24; }
    .pref-allowed { width: 1fr; padding: 1 0 0 1; color: $text-muted; }
    #prefs-error { color: $error; height: auto; min-height: 1; }
    #prefs-buttons { height: 3; align-horizontal: right; }
    """

    def __init__(self, paths: Paths) -> None:
        super().__init__()
        self._paths = paths
        self._fields = describe_fields()
        self._original: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        """The form: title, one row per preference, an error line and the buttons."""
        error = ""
        try:
            current = preferences_to_dict(load_file_preferences(self._paths))
        except ConfigError as exc:
            error = f"{exc} (fix the file with `volunteer config edit`; saving here is disabled)"
            current = preferences_to_dict(Preferences())
        with Vertical(id="prefs-dialog"):
            yield Label("Throttle preferences (saved to config.toml; esc cancels, ctrl+s saves)", id="prefs-title")
            with VerticalScroll(id="prefs-fields"):
                for info in self._fields:
                    section, _, name = info.key.partition(".")
                    text = value_text(current[section][name])
                    self._original[info.key] = text
                    yield self._row(info, text)
            yield Static(error, id="prefs-error")
            with Horizontal(id="prefs-buttons"):
                yield Button("Save", variant="primary", id="prefs-save", disabled=bool(error))
                yield Button("Cancel", id="prefs-cancel")

    @staticmethod
    def _row(info: FieldInfo, text: str) -> Horizontal:
        return Horizontal(
            Label(info.key, classes="pref-key"),
            Input(value=text, id=input_id(info.key), classes="pref-input"),
            Label(info.allowed(), classes="pref-allowed"),
            classes="pref-row",
        )

    def changes(self) -> dict[str, str]:
        """The preferences whose input differs from the file's value."""
        out: dict[str, str] = {}
        for info in self._fields:
            text = self.query_one(f"#{input_id(info.key)}", Input).value
            if text.strip() != self._original[info.key]:
                out[info.key] = text
        return out

    @on(Button.Pressed, "#prefs-save")
    def action_save(self) -> None:
        """Validate all changes, then write them one by one (each write is atomic)."""
        if self.query_one("#prefs-save", Button).disabled:
            return
        error = self.query_one("#prefs-error", Static)
        changes = self.changes()
        if not changes:
            self.dismiss(None)
            return
        try:
            parse_overrides(changes)  # validates everything before anything is written
            prefs: Preferences | None = None
            for key, text in changes.items():
                prefs = set_preference(self._paths, key, text)
        except ConfigError as exc:
            error.update(str(exc))
            return
        self.dismiss(prefs)

    @on(Button.Pressed, "#prefs-cancel")
    def action_cancel(self) -> None:
        """Close without saving."""
        self.dismiss(None)
