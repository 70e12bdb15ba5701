"""Shared fixtures: a tiny synthetic COCO set made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.synth import SynthConfig, synth


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """8 train and 4 val images at 128 px (ragged: heights 128 or 96)."""
    return synth(SynthConfig(out=tmp_path_factory.mktemp("synth"), train=8, val=4, image_size=128, seed=3))


@pytest.fixture(autouse=True)
def _single_thread_torch():
    torch.set_num_threads(2)
    yield
