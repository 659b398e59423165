"""Where the client keeps its files (platformdirs locations), overridable for tests and containers.

``VOLUNTEER_HOME`` moves everything under one directory (``config/``, ``data/``, ``cache/``, ``state/``),
which is what the Docker image and the tests use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "volunteer"


@dataclass(frozen=True, slots=True)
class Paths:
    """The client's directories."""

    config_dir: Path
    """Preferences (``config.toml``) and the control-endpoint token."""
    data_dir: Path
    """The identity key and other state that must survive upgrades."""
    cache_dir: Path
    """Downloaded data shards, benchmark results: safe to delete."""
    state_dir: Path
    """Run checkpoints, logs, the lock and control socket of a running client."""

    @property
    def identity_file(self) -> Path:
        """The installation's Ed25519 private key."""
        return self.data_dir / "identity.pem"

    @classmethod
    def default(cls) -> Paths:
        """``VOLUNTEER_HOME`` if set, else the platform's usual locations."""
        home = os.environ.get("VOLUNTEER_HOME")
        if home:
            return cls.under(Path(home))
        return cls(
            config_dir=Path(platformdirs.user_config_dir(APP_NAME)),
            data_dir=Path(platformdirs.user_data_dir(APP_NAME)),
            cache_dir=Path(platformdirs.user_cache_dir(APP_NAME)),
            state_dir=Path(platformdirs.user_state_dir(APP_NAME)),
        )

    @classmethod
    def under(cls, root: Path) -> Paths:
        """All directories below one root."""
        return cls(root / "config", root / "data", root / "cache", root / "state")
