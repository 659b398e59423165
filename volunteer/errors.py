"""The exception tree of the ``volunteer`` package: one root, branches by component."""

from __future__ import annotations


class VolunteerError(Exception):
    """Root of every error raised by the volunteer client. Its message is meant for the user."""


class ConfigError(VolunteerError):
    """Preferences or settings are invalid or cannot be read."""


class ClientError(VolunteerError):
    """The running client (runtime, control endpoint, status) refused or failed a request."""


class AlreadyRunningError(ClientError):
    """Another client is already running on this installation's identity."""


class ControlError(ClientError):
    """The control endpoint of a running client cannot be reached, or refused the request."""


class StatusFormatError(ClientError):
    """A status snapshot does not match its schema (wrong type, missing field, out of range)."""


class TensorError(VolunteerError):
    """A tensor could not be encoded, or bytes from the wire do not describe a valid tensor (bad header,
    unknown dtype or codec, sizes over the limits, payload inconsistent with its header)."""


class AveragingError(VolunteerError):
    """Averaging with other peers failed: the group, the tensors or the exchange did not fit together."""


class MatchmakingError(AveragingError):
    """No averaging group could be formed (too few peers ready within the matchmaking window)."""


class StateSyncError(AveragingError):
    """The newest state could not be downloaded: no donor had it, or every donor failed or was busy."""


class RunError(VolunteerError):
    """A run cannot be described, found or joined: its manifest, model template or data is unusable."""


class ManifestError(RunError):
    """A run manifest is invalid, tampered with, signed by the wrong owner, or needs another protocol version."""


class DataError(RunError):
    """Training data could not be produced, downloaded or read (bad shard, checksum mismatch, server error)."""


class OptimError(VolunteerError):
    """Collaborative training failed or was misused: a bad progress record, optimizer state that does not fit
    the model, or settings that cannot work together."""
