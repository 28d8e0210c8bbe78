"""scripts/bootstrap.sh's choice of the index torch is installed from (its --torch-plan)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PATH = "/usr/bin:/bin"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _plan(path: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"}
    done = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "bootstrap.sh"), "--torch-plan"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, "PATH": path, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _fake_nvidia_smi(folder) -> str:
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    return f"{folder}:{SYSTEM_PATH}"


def test_a_gpu_machine_takes_pips_default_index(tmp_path):
    plan = _plan(_fake_nvidia_smi(tmp_path))
    assert plan == "torch: first index: default (an NVIDIA GPU: nvidia-smi is on PATH)"


HAS_GPU = shutil.which("nvidia-smi", path=SYSTEM_PATH) or os.path.exists("/proc/driver/nvidia")


@pytest.mark.skipif(bool(HAS_GPU), reason="this machine has an NVIDIA GPU")
def test_a_machine_without_gpu_tries_the_cpu_index_first():
    plan = _plan(SYSTEM_PATH)
    assert plan == (
        f"torch: first index: {CPU_INDEX} "
        "(no NVIDIA GPU: no nvidia-smi on PATH, no /proc/driver/nvidia)"
    )


@pytest.mark.parametrize("index", ["https://example.invalid/whl/rocm", "default"])
def test_torch_index_url_overrides_the_detection(index, tmp_path):
    plan = _plan(_fake_nvidia_smi(tmp_path), TORCH_INDEX_URL=index)
    assert plan == f"torch: first index: {index} (TORCH_INDEX_URL is set)"
