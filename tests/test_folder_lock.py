"""One run per output folder: the lock (``folder_lock``), the tuner's run directory and
``mergekit-pcb``'s output, each against a second process that holds the folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from click.testing import CliRunner

from mergekit_pcb import folder_lock
from mergekit_pcb.cli import main as merge_main
from mergekit_pcb.tune.cli import main as tune_main
from mergekit_pcb.tune.run_dir import HISTORY_FILE
from tests.conftest import broken_copy, write_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")

# The other process takes the lock with plain fcntl, not with the module under test.
HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(120)
    """
)
PROBE = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except BlockingIOError:
        print("locked")
    """
)


@contextmanager
def held_by_another_process(folder: str) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, folder], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait()


def seen_from_another_process(folder: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", PROBE, folder], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_held_folder_is_refused_and_a_killed_holder_leaves_it_free(tmp_path):
    folder = str(tmp_path)
    with held_by_another_process(folder) as holder:
        with pytest.raises(folder_lock.FolderInUseError, match=r"^busy$"):
            folder_lock.acquire(folder, "busy")
        holder.kill()
        holder.wait()
        folder_lock.acquire(folder, "busy")  # the OS dropped the dead process's lock
    try:
        assert seen_from_another_process(folder) == "locked"
    finally:
        folder_lock.release(folder)
    assert seen_from_another_process(folder) == "free"
    assert os.listdir(folder) == []  # no lock file left behind


def test_the_lock_is_counted_within_a_process(tmp_path):
    folder = str(tmp_path)
    folder_lock.acquire(folder, "busy")
    folder_lock.acquire(folder, "busy")
    folder_lock.release(folder)
    assert seen_from_another_process(folder) == "locked"
    folder_lock.release(folder)
    assert seen_from_another_process(folder) == "free"


def test_a_second_tuner_run_on_a_folder_in_use_is_refused(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    out = tmp_path / "out"
    out.mkdir()
    args = [config, str(out), "--val", str(val), "--budget", "5", "--popsize", "4"]
    with held_by_another_process(str(out)):
        refused = CliRunner().invoke(tune_main, [*args, "--no-scale-search", "--quiet"])
    assert refused.exit_code == 1
    assert refused.output.splitlines() == [
        f"Error: {out} is in use by another tuning run that is still running; wait for it "
        "to end, or use another output directory"
    ]
    assert os.listdir(out) == []  # nothing written
    done = CliRunner().invoke(tune_main, [*args, "--no-scale-search", "--quiet"])
    assert done.exit_code == 0, done.output
    assert len((out / HISTORY_FILE).read_text().splitlines()) == 5
    assert seen_from_another_process(str(out)) == "free"  # released at the end


def test_a_second_merge_into_a_folder_in_use_is_refused(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with held_by_another_process(str(out)):
        refused = CliRunner().invoke(merge_main, [config, str(out)])
    assert refused.exit_code == 1
    assert refused.output.splitlines() == [
        f"Error: merge failed, {out} left unchanged: {out} is being written by another merge "
        "that is still running; wait for it to end, or use another output folder"
    ]
    assert os.listdir(out) == ["notes.txt"]
    assert CliRunner().invoke(merge_main, [config, str(out)]).exit_code == 0
    assert (out / "model.safetensors").exists() and (out / "notes.txt").read_text() == "mine"
    assert seen_from_another_process(str(out)) == "free"


def test_a_failed_merge_leaves_no_folder_where_there_was_none(tiny_models, tmp_path):
    tensor = "model.layers.1.mlp.down_proj.weight"
    broken = broken_copy(tiny_models["code"], str(tmp_path / "broken"), tensor, float("nan"))
    config = write_config(str(tmp_path / "pcb.yml"), {**tiny_models, "code": broken})
    result = CliRunner().invoke(merge_main, [config, str(tmp_path / "new"), "--quiet"])
    assert result.exit_code == 1 and "NaN or Inf" in result.output, result.output
    assert sorted(os.listdir(tmp_path)) == ["broken", "pcb.yml"]
