"""``--workers``: the candidates of each batch on Ray actors give the serial run's search.

Every Ray test checks the parallel run against a serial run of the same search (same
seed and budget, the tiny models): the history by candidate index, ``best.yml`` and
``summary.json``. Ray runs here as a local cluster on the CPU, 2 actors.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_pcb.tune import objectives
from mergekit_pcb.tune import parallel as tune_parallel
from mergekit_pcb.tune.cli import main as tune_main
from mergekit_pcb.tune.job import tune
from mergekit_pcb.tune.records import Evaluation
from mergekit_pcb.tune.run_dir import HISTORY_FILE, read_history
from mergekit_pcb.tune.search import SearchSettings

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY,
    reason="Ray is not installed: pip install 'ray[default]>=2.9' (CI installs it)",
)

REPO = Path(__file__).resolve().parent.parent
#: Budget 12 with 3 per generation: the scale search (7, then 1 or 2 beside the
#: best) and one CMA-ES generation, so batches of several sizes on 2 workers.
SETTINGS = SearchSettings(budget=12, popsize=3, seed=3)
TIMINGS = ("seconds", "objective_seconds")


@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("val") / "val.jsonl"
    rows = [{"prompt": f"{i}+{i % 7}=", "completion": str(i + i % 7)} for i in range(24)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def workers(val_file):
    """2 actors on a local cluster of 2 CPUs, shared by the in-process tests (each
    tune() sets them up again, with the objective a test puts in ``.objective``)."""
    import ray

    from mergekit_pcb.tune.parallel import RayWorkers

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with RayWorkers(2, objectives.validation_loss([val_file])) as pool:
            yield pool
    finally:
        ray.shutdown()


def _tune(tune_config: str, out_dir: Path, objective, make_evaluator=None):
    identity = {"kind": "test", "name": objective.name}
    return tune(
        tune_config,
        str(out_dir),
        objective,
        SETTINGS,
        identity_objective=identity,
        quiet=True,
        make_evaluator=make_evaluator,
    )


def _rows(out_dir: Path) -> list[dict]:
    """history.jsonl by candidate index, without the timings."""
    rows = read_history(str(out_dir / HISTORY_FILE), Evaluation.from_row)
    return [{k: v for k, v in rows[i].to_row().items() if k not in TIMINGS} for i in sorted(rows)]


def _assert_same_run(parallel: Path, serial: Path, resumed: int = 0) -> None:
    """The same history, best.yml and summary.json; ``resumed``: rows replayed by the
    parallel run (the summary's count of them, where a straight run says 0)."""
    assert _rows(parallel) == _rows(serial)
    assert (parallel / "best.yml").read_text() == (serial / "best.yml").read_text()
    summary = json.loads((parallel / "summary.json").read_text())
    assert summary.pop("resumed") == resumed
    expected = json.loads((serial / "summary.json").read_text())
    assert expected.pop("resumed") == 0
    assert summary == expected


@pytest.fixture(scope="module")
def serial_run(tune_config, val_file, tmp_path_factory) -> Path:
    """The reference: the normalised validation loss, searched serially in this process."""
    out = tmp_path_factory.mktemp("serial") / "run"
    _tune(tune_config, out, objectives.validation_loss([val_file], normalized=True))
    return out


@needs_ray
@pytest.mark.slow
def test_two_workers_give_the_serial_run(tune_config, val_file, serial_run, workers, tmp_path):
    replaced = workers.replaced
    # Normalised: the reference scores, computed by the driver, reach the workers.
    workers.objective = objective = objectives.validation_loss([val_file], normalized=True)
    result = _tune(tune_config, tmp_path / "run", objective, make_evaluator=workers)
    _assert_same_run(tmp_path / "run", serial_run)
    assert len(result.history) == len(_rows(serial_run)) and all(e.ok for e in result.history)
    # Two actors in two processes, one torch thread each on the 2-CPU cluster.
    assert len({info["pid"] for info in workers.info}) == 2
    assert [(info["device"], info["threads"]) for info in workers.info] == [("cpu", 1)] * 2
    assert workers.setup["total"] >= workers.setup["workers"] > 0
    assert workers.replaced == replaced


@needs_ray
def test_workers_read_contributions_kept_on_disk(
    tune_config, val_file, serial_run, workers, tmp_path
):
    workers.objective = objective = objectives.validation_loss([val_file], normalized=True)
    identity = {"kind": "test", "name": objective.name}
    out = tmp_path / "run"
    tune(
        tune_config,
        str(out),
        objective,
        SETTINGS,
        identity_objective=identity,
        quiet=True,
        make_evaluator=workers,
        contributions="disk",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert "on disk" in summary["contributions"]["placement"]
    assert _rows(out) == _rows(serial_run)
    assert (out / "best.yml").read_text() == (serial_run / "best.yml").read_text()


class _InterruptingRay:
    """Ray, but its third ``wait`` lets every running candidate finish, then raises
    KeyboardInterrupt: a Ctrl-C while finished evaluations wait to be collected."""

    def __init__(self, ray):
        self.ray, self.waits = ray, 0

    def __getattr__(self, name: str):
        return getattr(self.ray, name)

    def wait(self, refs, **kw):
        self.waits += 1
        if self.waits == 3:
            self.ray.wait(refs, num_returns=len(refs))
            raise KeyboardInterrupt
        return self.ray.wait(refs, **kw)


@needs_ray
def test_a_ctrl_c_loses_no_finished_evaluation_and_the_run_resumes(
    tune_config, val_file, serial_run, workers, tmp_path
):
    workers.objective = objective = objectives.validation_loss([val_file], normalized=True)

    def interrupting(contributions, model, tokenizer):
        evaluator = workers(contributions, model, tokenizer)
        evaluator.ray = _InterruptingRay(evaluator.ray)
        return evaluator

    with pytest.raises(KeyboardInterrupt):
        _tune(tune_config, tmp_path / "run", objective, make_evaluator=interrupting)
    # Two collected before the interrupt, and the two that had finished when it came.
    assert len((tmp_path / "run" / HISTORY_FILE).read_text().splitlines()) == 4

    resumed = _tune(tune_config, tmp_path / "run", objective, make_evaluator=workers)
    assert resumed.search.resumed == 4
    _assert_same_run(tmp_path / "run", serial_run, resumed=4)


#: A user's objective file: a score of the weights that no thread count changes
#: (64 entries of one tuned tensor), and deaths on cue. In a Ray worker (another
#: process than DRIVER), call number 3 kills its worker once; from call number 8 on,
#: the first candidate that has not killed a worker yet is doomed: it kills every
#: worker that tries it (in the driver, a doomed candidate raises instead). A file
#: named ``slow`` makes each call sleep.
OBJECTIVE_FILE = """
import fcntl
import hashlib
import os
import time

STATE = {state!r}
DRIVER = {driver}


def _lines(name):
    path = os.path.join(STATE, name)
    return open(path).read().split() if os.path.exists(path) else []


def _append(name, line):
    with open(os.path.join(STATE, name), "a") as file:
        file.write(line + "\\n")


def _dies(key):
    # One call at a time (across processes): count it and decide.
    with open(os.path.join(STATE, "calls"), "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        number = len(file.read().split()) + 1
        file.write(str(number) + "\\n")
        file.flush()
        doomed, deaths = _lines("doomed"), _lines("deaths")
        if os.getpid() == DRIVER:
            if key in doomed:
                raise RuntimeError("doomed candidate")
            return False
        if key in doomed or number == 3:
            _append("deaths", key)
            return True
        if not doomed and number >= 8 and key not in deaths:
            _append("doomed", key)
            _append("deaths", key)
            return True
        return False


def score(model, tokenizer):
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().reshape(-1)[:64]
    key = hashlib.sha1(weight.double().numpy().tobytes()).hexdigest()
    if _dies(key):
        os._exit(1)
    if os.path.exists(os.path.join(STATE, "slow")):
        time.sleep(0.5)
    return float(((weight.double() - 0.01) ** 2).sum())
"""


def _objective_file(tmp_path: Path, driver: int) -> tuple[str, Path]:
    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "user_objective.py"
    path.write_text(textwrap.dedent(OBJECTIVE_FILE.format(state=str(state), driver=driver)))
    return f"{path}:score", state


@needs_ray
@pytest.mark.slow
def test_dead_workers_are_replaced_and_their_candidates_retried_once(
    tune_config, workers, tmp_path, caplog
):
    spec, state = _objective_file(tmp_path, driver=os.getpid())
    # From a file module: it reaches the workers by value, not by an import there.
    workers.objective = objective = objectives.load_user_objective(spec, maximize=False)
    replaced = workers.replaced
    with caplog.at_level(logging.WARNING):
        parallel = _tune(tune_config, tmp_path / "parallel", objective, make_evaluator=workers)
    deaths = (state / "deaths").read_text().split()
    doomed = (state / "doomed").read_text().split()
    assert len(doomed) == 1 and deaths.count(doomed[0]) == 2 and len(deaths) == 3
    assert workers.replaced - replaced == 3
    assert "retrying it on another worker" in caplog.text
    failed = [e for e in parallel.history if not e.ok]
    assert len(failed) == 1 and "died on both attempts" in failed[0].error

    # The serial run, whose doomed candidate raises: the same search.
    serial = _tune(
        tune_config, tmp_path / "serial", objectives.load_user_objective(spec, maximize=False)
    )
    assert [e.index for e in serial.history if not e.ok] == [failed[0].index]
    assert "doomed candidate" in next(e.error for e in serial.history if not e.ok)
    rows = [{**r, "error": r["error"] is None} for r in _rows(tmp_path / "parallel")]
    assert rows == [{**r, "error": r["error"] is None} for r in _rows(tmp_path / "serial")]
    assert (tmp_path / "parallel" / "best.yml").read_text() == (
        tmp_path / "serial" / "best.yml"
    ).read_text()


def _shared(pool):
    """``ray_workers`` for the command that lends it ``pool`` (not closed after it)."""
    original = tune_parallel.ray_workers

    @contextmanager
    def ray_workers(count, objective, address=None):
        if count is None:
            with original(count, objective, address) as none:
                yield none
            return
        assert (count, address) == (len(pool.info), None)
        pool.objective = objective
        yield pool

    return ray_workers


def _command_line(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""


@needs_ray
@pytest.mark.slow
def test_ctrl_c_on_the_command_leaves_no_cluster_and_the_run_resumes(
    tune_config, workers, tmp_path, monkeypatch
):
    """The command in its own session, interrupted as a terminal's Ctrl-C does (SIGINT
    to the whole process group), mid-search; then resumed, with 2 workers again."""
    pytest.importorskip("psutil")
    import psutil

    spec, state = _objective_file(tmp_path, driver=os.getpid())
    (state / "slow").touch()
    # Past the cues: no deaths in this test.
    (state / "doomed").write_text("no-candidate\n")
    (state / "calls").write_text("1\n" * 10)
    args = [tune_config, str(tmp_path / "run"), "--objective", "function", "--function", spec]
    args += ["--minimize", "--budget", "12", "--popsize", "3", "--seed", "3", "--workers", "2"]
    command = [sys.executable, "-m", "mergekit_pcb.tune.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    history = tmp_path / "run" / HISTORY_FILE
    deadline = time.monotonic() + 300
    while not (history.exists() and len(history.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the command wrote no history"
        time.sleep(0.2)
    # The local cluster the command started: its processes, the raylet among them.
    children = psutil.Process(process.pid).children(recursive=True)
    assert any("raylet" in _command_line(child) for child in children)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    _, alive = psutil.wait_procs(children, timeout=30)
    assert [_command_line(p) for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    written = read_history(str(history), Evaluation.from_row)
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"Interrupted: {len(written)} evaluations kept in {history}; run the same command "
        "again to resume from them."
    )
    assert len(written) >= 3 and all(e.ok for e in written.values())

    (state / "slow").unlink()
    (state / "calls").write_text("1\n" * 10)
    # Resumed in this process by the same command, on the actors of this module.
    monkeypatch.setattr(tune_parallel, "ray_workers", _shared(workers))
    resumed = CliRunner().invoke(tune_main, args, catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    total = len(read_history(str(history), Evaluation.from_row))
    assert len(written) < total and f"over {total} evaluations" in resumed.output
    # Nothing evaluated twice: the resumed run scored only what was missing.
    assert len((state / "calls").read_text().split()) - 10 == total - len(written)

    serial = CliRunner().invoke(tune_main, [*args[:1], str(tmp_path / "serial"), *args[2:-2]])
    assert serial.exit_code == 0, serial.output
    _assert_same_run(tmp_path / "run", tmp_path / "serial", resumed=len(written))


@pytest.mark.slow
def test_without_ray_the_command_says_how_to_get_it(tune_config, val_file, tmp_path):
    """With Ray unimportable: the package imports, and --workers says what to install."""
    script = (
        "import sys; sys.modules['ray'] = None\nfrom mergekit_pcb.tune.cli import main\nmain()\n"
    )
    args = [tune_config, str(tmp_path / "run"), "--val", val_file, "--workers", "2"]
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "Error: --workers needs Ray" in done.stderr
    assert "pip install 'ray[default]>=2.9'" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


def test_ray_address_needs_workers(tune_config, val_file, tmp_path):
    args = [tune_config, str(tmp_path / "run"), "--val", val_file, "--ray-address", "auto"]
    result = CliRunner().invoke(tune_main, args)
    assert result.exit_code == 1 and "--ray-address needs --workers N" in result.output
