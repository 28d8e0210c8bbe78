"""The math modules are torch only: they import neither mergekit nor transformers.

Checked in a fresh interpreter. The package's ``__init__`` registers ``pcb`` with
mergekit (that is the glue's job), so the math modules are imported here with the
package entry standing in for it: what is loaded then is what they need themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import mergekit_pcb

MATH_MODULES = (
    "pcb",
    "selection",
    "work_buffers",
    "model_stats",
    "evolve.offspring",
    "evolve.evolver",
)

_PROBE = """
import importlib, json, sys, types
package = types.ModuleType("mergekit_pcb")
package.__path__ = [sys.argv[1]]
sys.modules["mergekit_pcb"] = package
for name in sys.argv[2:]:
    importlib.import_module("mergekit_pcb." + name)
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps(loaded))
"""


def _top_level_modules_loaded_by(*modules: str) -> set[str]:
    folder = os.path.dirname(mergekit_pcb.__file__)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, folder, *modules],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(json.loads(out))


@pytest.mark.slow
def test_the_math_modules_import_neither_mergekit_nor_transformers():
    loaded = _top_level_modules_loaded_by(*MATH_MODULES)
    assert "torch" in loaded
    assert not loaded & {"mergekit", "transformers"}


@pytest.mark.slow
def test_the_probe_sees_the_glue_import_mergekit():
    # The check above can fail: the same probe on a glue module sees mergekit.
    assert "mergekit" in _top_level_modules_loaded_by("method_scope")
