"""volunteer: a BOINC-like client for decentralized deep learning."""

__version__ = "0.1.0"
