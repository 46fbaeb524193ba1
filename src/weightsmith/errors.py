"""User-facing error types.

Every failure a user can cause (a bad path, a broken checkpoint, a wrong flag)
raises a `WeightsmithError` subclass whose message says what happened, where,
and how to fix it. The CLI prints the message as one line and exits 1.
Internal invariants use `assert`, not these classes.
"""

from __future__ import annotations


class WeightsmithError(Exception):
    """Base class for errors caused by user input or environment."""

    exit_code = 1


class UsageError(WeightsmithError):
    """A command line or config that cannot be parsed (exit status 2)."""

    exit_code = 2


class CheckpointError(WeightsmithError):
    """A checkpoint file or directory is missing, broken or unsupported."""


class ConfigError(WeightsmithError):
    """A model or command config has a bad or conflicting field."""


class ModelNotFoundError(WeightsmithError):
    """A model name is neither in the store, the catalog, nor a path."""


class PullError(WeightsmithError):
    """Fetching a model failed (offline, bad checksum, unknown repo)."""


class GenerationError(WeightsmithError):
    """A generation request cannot be served (e.g. prompt longer than the context)."""
