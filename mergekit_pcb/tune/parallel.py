"""The candidates of each batch evaluated in parallel by Ray actors (``--workers N``).

:class:`RayWorkers` is a context manager around a Ray cluster and a pool of actors;
it is also the ``make_evaluator`` factory that :func:`mergekit_pcb.tune.job.tune`
calls with the captured contributions, the live model and the tokenizer::

    with RayWorkers(2, objective) as make_evaluator:
        tune(config, out_dir, objective, settings, make_evaluator=make_evaluator)

* **Cluster.** ``address=None`` starts a local Ray cluster, shut down on leaving
  (also on Ctrl-C or an error); an address joins that cluster, which is left running.
  A Ray already initialised in this process is used as it is. Ray is imported only
  here, lazily: the package imports without it.
* **Set-up, once.** The actors start when the context is entered, so that their
  imports overlap the driver's capture. The captured contributions (from the CPU),
  the fixed tensors, the tokenizer and the objective then go into Ray's object
  store once (``ray.put``); every actor reads them from there, loads the base model
  from its path on its own device (one GPU each when the cluster has GPUs, else
  the CPU) and places the contributions as the serial tuner does (the same
  :func:`~mergekit_pcb.tune.placement.place`; ``auto``: beside the parameters while
  they fit, then CPU memory). Terms that the driver put on disk are read from the
  same files, so such a run needs the workers on the driver's machine (or a shared
  file system). The set-up time is measured and logged apart from the evaluations
  (:attr:`RayWorkers.setup`).
* **Evaluation.** An actor scores a candidate with
  :func:`~mergekit_pcb.tune.records.evaluate_candidate`, as the serial tuner does,
  so errors, non-finite scores and timings are recorded the same way. Finished
  evaluations are yielded as they come (the driver writes them to ``history.jsonl``
  at once and orders rows by candidate index when reading), so the search, its
  history and its outputs are the serial run's.
* **A worker that dies** (its process killed, out of memory, its node lost): it is
  replaced by a fresh actor, and its candidate is retried once on another worker;
  if that one dies too, the candidate is scored as failed and the search goes on.
  Workers that keep dying without finishing anything stop the run.
* **Ctrl-C.** Evaluations that finished but were not yet collected are handed to the
  search (and so written) before the interrupt goes on; the actors are killed and
  a local cluster is shut down.
* **Threads.** Each actor is scheduled with 1 CPU (so that N workers fit on N
  cores) and runs ``torch.set_num_threads(cpus of its node // workers on its
  node)``: 1 thread each for 2 CPU workers on 2 cores, where torch's default (every
  core, in every actor) would oversubscribe the cores.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

import torch

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.tune.contributions import Contributions, DiskStore, TensorTerms
from mergekit_pcb.tune.objectives import Objective
from mergekit_pcb.tune.records import Candidate, Evaluation, Outcome, evaluate_candidate
from mergekit_pcb.tune.weight_layout import WeightLayout

LOG = logging.getLogger(__name__)

RAY_MISSING = "--workers needs Ray, which is not installed: pip install 'ray[default]>=2.9'"
#: How often the set-up says that it still waits for actors to be placed.
_PLACEMENT_NOTICE_S = 60.0


def import_ray() -> ModuleType:
    """Ray, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(RAY_MISSING) from error
    return ray


def threads_per_worker(node_cpus: float, workers_on_node: int) -> int:
    """torch threads for each of ``workers_on_node`` actors sharing ``node_cpus`` cores."""
    return max(1, int(node_cpus) // max(1, workers_on_node))


@dataclass
class _Payload:
    """What every actor needs, put into the object store once."""

    model_names: list[str]
    method: str
    terms: dict[str, TensorTerms]  # in CPU memory, or placeholders of terms on disk
    fixed: dict[str, torch.Tensor]
    layout: WeightLayout
    placement_mode: str
    disk_directory: str | None
    disk_location: dict[str, str]
    base_path: str
    dtype: torch.dtype
    tokenizer: Any
    objective: Objective

    @property
    def shipped_bytes(self) -> int:
        """Bytes of tensors shipped: the terms in memory (with their base) and the fixed
        tensors; terms on disk travel as placeholders."""
        terms = sum(t.stored_bytes for t in self.terms.values() if not t.on_disk)
        return terms + sum(t.numel() * t.element_size() for t in self.fixed.values())


def _on_cpu(terms: TensorTerms) -> bool:
    tensors = [row.values for row in terms.rows.values()]
    if terms.base is not None:
        tensors.append(terms.base)
    return all(t.device.type == "cpu" for t in tensors)


def _payload(
    contributions: Contributions, live_model: Any, tokenizer: Any, objective: Objective
) -> _Payload:
    base_path = getattr(live_model, "name_or_path", None)
    if not base_path:
        raise ValueError("the live model does not say where it was loaded from (name_or_path)")
    if getattr(live_model, "hf_device_map", None):
        raise ConfigError(
            "--device-map spreads one model over several GPUs, and --workers gives each "
            "worker one: use one or the other"
        )
    # Terms on disk travel as their placeholders ("meta"); the others from the CPU, as
    # they are when they live there (no copy), else a copy.
    terms = {
        name: t if t.on_disk or _on_cpu(t) else t.to("cpu")
        for name, t in contributions.terms.items()
    }
    disk = contributions.disk
    return _Payload(
        model_names=list(contributions.model_names),
        method=contributions.method,
        terms=terms,
        fixed={name: value.cpu() for name, value in contributions.fixed.items()},
        layout=contributions.layout,
        placement_mode=contributions.placement.mode if contributions.placement else "auto",
        disk_directory=disk.directory if disk is not None else None,
        disk_location=dict(disk.location) if disk is not None else {},
        base_path=str(base_path),
        dtype=live_model.dtype,
        tokenizer=tokenizer,
        objective=objective,
    )


class Worker:
    """One actor: a live model on its device, the contributions and the objective.

    Built without the payload, the actor only imports this package (torch,
    transformers, mergekit: most of its start-up), which overlaps the driver's own
    capture; :meth:`setup` then takes the payload. A replacement actor gets the
    payload at once, so that a failed set-up is a dead actor.
    """

    def __init__(self, payload: _Payload | None = None):
        from mergekit_pcb.tune import job  # noqa: F401  (mergekit and transformers, now)

        if payload is not None:
            self.setup(payload)

    def setup(self, payload: _Payload) -> dict[str, Any]:
        import ray
        from transformers.utils import logging as transformers_logging

        from mergekit_pcb.tune.live_model import load_model
        from mergekit_pcb.tune.placement import place, placement_for

        began = time.perf_counter()
        # Every worker's loading bar would reach the driver's terminal, interleaved.
        transformers_logging.disable_progress_bar()
        # Ray hides the GPUs an actor was not given, so "cuda" is this actor's own GPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(payload.base_path, payload.dtype, self.device)
        disk = None
        if payload.disk_directory is not None:
            missing = sorted({p for p in payload.disk_location.values() if not os.path.exists(p)})
            if missing:
                raise ConfigError(
                    f"the contributions were put on disk ({payload.disk_directory}), which "
                    f"a Ray worker cannot read ({missing[0]} is missing there): run the "
                    "workers on the driver's machine, share that folder, or keep the "
                    "contributions in memory (--contributions cpu)"
                )
            disk = DiskStore(payload.disk_directory)
            disk.location = dict(payload.disk_location)
        # Placed as the serial tuner places them, within this worker's own budgets; the
        # payload's terms are this process's own (no copy where they are), and it writes
        # no shards (terms placed on "disk" stay in its memory).
        placement = placement_for(payload.placement_mode, [self.device])
        terms = {
            name: place(placement, name, t, self.device, None, copy=False)
            for name, t in payload.terms.items()
        }
        contributions = Contributions(
            payload.model_names,
            payload.method,
            terms,
            payload.fixed,
            layout=payload.layout,
            disk=disk,
            placement=placement,
        )
        contributions.load_fixed(model)
        self.scorer = contributions.scorer(model, payload.tokenizer, payload.objective)
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "device": self.device,
            "setup_seconds": time.perf_counter() - began,
        }

    def set_threads(self, threads: int) -> int:
        torch.set_num_threads(threads)
        return torch.get_num_threads()

    def evaluate(self, candidate: Candidate) -> Evaluation:
        # As tune()'s serial evaluation.
        return evaluate_candidate(self.scorer, candidate)


class _Pool:
    """``size`` actor slots; a dead actor is replaced in its slot."""

    def __init__(self, ray: ModuleType, size: int, gpus: bool):
        self.ray = ray
        self.gpus = gpus
        self.payload_ref: Any = None
        self.info: list[dict[str, Any]] = [{} for _ in range(size)]
        self.replaced = 0
        options: dict[str, Any] = {"num_cpus": 1, "max_concurrency": 1}
        if gpus:
            options["num_gpus"] = 1
        else:
            options["scheduling_strategy"] = "SPREAD"  # CPU workers: one node each first
        self.actor_class = ray.remote(Worker).options(**options)
        self.actors: list[Any] = [self._start() for _ in range(size)]

    def _start(self, payload_ref: Any = None) -> Any:
        if payload_ref is None:
            return self.actor_class.remote()
        return self.actor_class.remote(payload_ref)

    def setup(self, payload_ref: Any) -> None:
        """Give every actor the payload; wait until all are set up; set their threads."""
        self.payload_ref = payload_ref
        pending = {actor.setup.remote(payload_ref): slot for slot, actor in enumerate(self.actors)}
        began = time.perf_counter()
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=len(pending), timeout=10)
            for ref in done:
                slot = pending.pop(ref)
                try:
                    self.info[slot] = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError as error:
                    cause = error.cause
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise RuntimeError(f"a Ray worker failed to set up: {_reason(error)}") from None
                except self.ray.exceptions.RayActorError as error:
                    raise RuntimeError(f"a Ray worker failed to start: {_reason(error)}") from None
            if pending and time.perf_counter() - began > _PLACEMENT_NOTICE_S:
                LOG.warning(
                    "still waiting for %d Ray worker(s) to be placed and set up "
                    "(does the cluster have the free %s?)",
                    len(pending),
                    "GPUs" if self.gpus else "CPUs",
                )
                began = time.perf_counter()
        cpus = {
            node["NodeID"]: node.get("Resources", {}).get("CPU", 1)
            for node in self.ray.nodes()
            if node.get("Alive", True)
        }
        per_node = Counter(info["node"] for info in self.info)
        refs = [
            actor.set_threads.remote(
                threads_per_worker(cpus.get(info["node"], 1), per_node[info["node"]])
            )
            for actor, info in zip(self.actors, self.info, strict=True)
        ]
        for info, threads in zip(self.info, self.ray.get(refs), strict=True):
            info["threads"] = threads

    def replace(self, slot: int) -> Any:
        """Kill the actor in ``slot`` (it may only look dead) and start another there;
        return the reference of its first call, ready once it is set up."""
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            LOG.debug("killing a dead worker", exc_info=True)
        threads = self.info[slot].get("threads", 1)
        self.actors[slot] = self._start(self.payload_ref)
        self.info[slot] = {"replacement": True}
        self.replaced += 1
        # Its node is not known yet: it takes the threads of the worker it replaces.
        return self.actors[slot].set_threads.remote(threads)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # a dead actor, or the cluster gone
                LOG.debug("killing a worker on close", exc_info=True)
        self.actors = []


def _reason(error: BaseException) -> str:
    """The first line of a Ray error's message (they run to many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@dataclass
class _Attempt:
    """A candidate on its way: the deaths it caused so far, and when it was first sent."""

    candidate: Candidate
    deaths: list[str]
    began: float


class RayEvaluator:
    """A :class:`~mergekit_pcb.tune.records.BatchEvaluator` over a pool of Ray actors.

    A slot is idle, busy with a candidate, or starting (a replacement actor, which
    takes candidates once it is set up: a retry goes to a worker that is ready).
    """

    def __init__(self, ray: ModuleType, pool: _Pool):
        self.ray = ray
        self.pool = pool
        self.idle: list[int] = list(range(len(pool.actors)))
        self.starting: dict[Any, int] = {}  # a replacement's first call -> its slot
        # Deaths without a finished evaluation in between; beyond this, stop the run.
        self.max_deaths_in_a_row = 2 * len(pool.actors) + 1
        self.deaths_in_a_row = 0

    def evaluate_batch(self, candidates: Sequence[Candidate]) -> Iterator[Evaluation]:
        ray = self.ray
        queue = deque(_Attempt(c, [], time.perf_counter()) for c in candidates)
        running: dict[Any, tuple[int, _Attempt]] = {}
        try:
            while queue or running:
                while queue and self.idle:
                    slot, attempt = self.idle.pop(0), queue.popleft()
                    ref = self.pool.actors[slot].evaluate.remote(attempt.candidate)
                    running[ref] = (slot, attempt)
                ready, _ = ray.wait([*running, *self.starting], num_returns=1)
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                        continue
                    slot, attempt = running[ref]
                    evaluation = self._collect(ref, slot, attempt, queue)
                    del running[ref]
                    if evaluation is not None:
                        yield evaluation
        except KeyboardInterrupt:
            # Hand over what finished before the interrupt, so that it is written.
            if running:
                done, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
                for ref in done:
                    try:
                        evaluation = ray.get(ref, timeout=0)
                    except ray.exceptions.RayError:
                        continue
                    yield evaluation
            raise

    def _collect(
        self, ref: Any, slot: int, attempt: _Attempt, queue: deque[_Attempt]
    ) -> Evaluation | None:
        """The finished evaluation, a failed one, or None where the candidate is retried."""
        try:
            evaluation = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:
            return self._died(slot, attempt, error, queue)
        except self.ray.exceptions.RayError as error:
            # Not the objective's error (the actor catches those): Ray's own, such as a
            # candidate that could not be sent. Scored as failed.
            self.idle.append(slot)
            return _failed(attempt, f"{type(error).__name__}: {error}")
        self.idle.append(slot)
        self.deaths_in_a_row = 0
        return evaluation

    def _started(self, ref: Any) -> None:
        slot = self.starting.pop(ref)
        try:
            self.pool.info[slot]["threads"] = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:  # the replacement did not start
            self._count_death(error)
            self._replace(slot)
            return
        self.idle.append(slot)

    def _count_death(self, error: BaseException) -> str:
        reason = _reason(error)
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row > self.max_deaths_in_a_row:
            raise RuntimeError(
                f"Ray workers keep dying: {self.deaths_in_a_row} in a row without a "
                f"finished evaluation; the last: {reason}"
            )
        return reason

    def _replace(self, slot: int) -> None:
        self.starting[self.pool.replace(slot)] = slot

    def _died(
        self, slot: int, attempt: _Attempt, error: BaseException, queue: deque[_Attempt]
    ) -> Evaluation | None:
        """Replace the dead worker; requeue its candidate once, else return it failed."""
        reason = self._count_death(error)
        self._replace(slot)
        attempt.deaths.append(reason)
        if len(attempt.deaths) == 1:
            LOG.warning(
                "a Ray worker died evaluating candidate %d (%s); retrying it on another worker",
                attempt.candidate.index,
                reason,
            )
            queue.appendleft(attempt)
            return None
        return _failed(
            attempt,
            "\n".join(f"attempt {k + 1}: {d}" for k, d in enumerate(attempt.deaths))
            + f"\nWorkerDiedError: the worker died on both attempts at this candidate ({reason})",
        )


def _failed(attempt: _Attempt, error: str) -> Evaluation:
    """The candidate scored as failed, for a reason of Ray's rather than the objective's."""
    return attempt.candidate.recorded(Outcome.failed(error, time.perf_counter() - attempt.began))


class RayWorkers:
    """A Ray cluster and ``workers`` actors; the ``make_evaluator`` factory for ``tune()``.

    Entering connects to (or starts) the cluster and starts the actors, which load
    their libraries while ``tune()`` captures the contributions; calling it (as
    ``tune()`` does) sends them the payload and waits until they are set up. Several
    ``tune()`` calls in turn may share the actors (each sets them up again).
    ``objective`` is what the actors score with: the one given to ``tune()`` (sent
    when the factory is called, after ``tune()`` has set a normalised objective's
    reference scores; set the attribute between calls to change it). ``address``:
    join that cluster; None starts a local one. :attr:`setup` holds the set-up
    seconds of the last call: ``cluster`` (start or join, and start the actors),
    ``ship`` (the payload into the object store), ``workers`` (waiting for the
    actors after the capture) and ``total``, what the set-up added to the run.
    """

    def __init__(self, workers: int, objective: Objective, *, address: str | None = None):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.objective = objective
        self.address = address
        self.setup: dict[str, float] = {}
        self.info: list[dict[str, Any]] = []
        self._ray: ModuleType | None = None
        self._started = False
        self._pool: _Pool | None = None
        self._calls = 0

    def __enter__(self) -> RayWorkers:
        self._ray = import_ray()  # before any heavy work: say at once that Ray is missing
        try:
            began = time.perf_counter()
            self._connect()
            resources = self._ray.cluster_resources()
            gpus = resources.get("GPU", 0) >= 1
            available = resources.get("GPU" if gpus else "CPU", 0)
            if self.workers > available:
                raise ConfigError(
                    f"--workers {self.workers} needs one {'GPU' if gpus else 'CPU'} per "
                    f"worker; the Ray cluster has {available:g}"
                )
            self._pool = _Pool(self._ray, self.workers, gpus)
            self.setup["cluster"] = time.perf_counter() - began
        except BaseException:  # Ctrl-C included: no cluster is left behind
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors; shut down the cluster if this object started it."""
        if self._pool is not None:
            self._pool.close()  # kept, closed: it still counts the replaced workers
        if self._started and self._ray is not None:
            self._ray.shutdown()
            self._started = False

    @property
    def replaced(self) -> int:
        """How many dead workers were replaced."""
        return self._pool.replaced if self._pool is not None else 0

    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            LOG.info("using the Ray already initialised in this process")
            return
        self._started = self.address is None  # set first: a half-started cluster is shut too
        if self.address is None:
            # "local": a new cluster of this machine, not one found running
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=self.address, logging_level=logging.WARNING)

    def __call__(self, contributions: Contributions, live_model: Any, tokenizer: Any) -> Any:
        if self._pool is None or self._ray is None or not self._pool.actors:
            raise RuntimeError("use RayWorkers as a context manager: with RayWorkers(...) as ...")
        ray = self._ray
        began = time.perf_counter()
        payload = _payload(contributions, live_model, tokenizer, self.objective)
        payload_ref = ray.put(payload)  # once: every actor reads it from the object store
        self.setup["ship"] = time.perf_counter() - began
        waited = time.perf_counter()
        self._pool.setup(payload_ref)
        self.setup["workers"] = time.perf_counter() - waited
        if self._calls:  # the cluster and the actors were started for an earlier call
            self.setup["cluster"] = 0.0
        self._calls += 1
        self.setup["total"] = self.setup["cluster"] + time.perf_counter() - began
        self.info = self._pool.info
        devices = Counter(info["device"] for info in self.info)
        LOG.info(
            "Ray set-up %.1f s, not in the evaluations' timings: cluster and workers "
            "started in %.1f s, contributions and objective shipped once (%.1f MiB) in "
            "%.1f s, %d workers (%s; torch threads %s) ready %.1f s later",
            self.setup["total"],
            self.setup["cluster"],
            payload.shipped_bytes / 2**20,
            self.setup["ship"],
            self.workers,
            ", ".join(f"{n} on {d}" for d, n in devices.items()),
            "/".join(str(info["threads"]) for info in self.info),
            self.setup["workers"],
        )
        return RayEvaluator(ray, self._pool)


def ray_workers(
    workers: int | None, objective: Objective, address: str | None = None
) -> RayWorkers | _NoWorkers:
    """The context for ``--workers``/``--ray-address``: :class:`RayWorkers`, or for no
    ``workers`` a context that yields None (serial evaluation in this process)."""
    if workers is None:
        if address is not None:
            raise ValueError("--ray-address needs --workers N")
        return _NoWorkers()
    return RayWorkers(workers, objective, address=address)


class _NoWorkers:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
