"""The exception tree of the ``volunteer`` package: one root, branches by component."""

from __future__ import annotations


class VolunteerError(Exception):
    """Root of every error raised by the volunteer client. Its message is meant for the user."""


class ConfigError(VolunteerError):
    """Preferences or settings are invalid or cannot be read."""
