"""Shared fixtures: tiny Llama models written once per test session."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file

from mergekit_pcb.synthetic import write_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """A base and three synthetic fine-tunes (float32), name -> folder."""
    return write_tiny_models(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def tune_config(tiny_models, tmp_path_factory) -> str:
    """The tuner tests' pcb config of the tiny models: code at density 0.3, lambda 1.1."""
    path = str(tmp_path_factory.mktemp("tune") / "pcb.yml")
    return write_config(
        path, tiny_models, per_model={"code": {"density": 0.3}}, parameters={"lambda": 1.1}
    )


def write_config(path: str, models: dict[str, str], **overrides) -> str:
    """A pcb mergekit config over ``models`` (``base`` plus fine-tunes) at ``path``."""
    per_model = overrides.pop("per_model", {})
    config = {
        "merge_method": "pcb",
        "base_model": models["base"],
        "models": [
            {"model": p, "parameters": {"weight": 1.0, "density": 0.2, **per_model.get(n, {})}}
            for n, p in models.items()
            if n != "base"
        ],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
    }
    config.update(overrides)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file)
    return path


def broken_copy(source: str, dest: str, tensor: str, value: float) -> str:
    """A copy of the model at ``source`` with ``value`` (NaN, Inf) in one entry of ``tensor``."""
    shutil.copytree(source, dest)
    path = os.path.join(dest, "model.safetensors")
    state = load_file(path)
    state[tensor].view(-1)[7] = value
    save_file(state, path, metadata={"format": "pt"})
    return dest
