"""``mergekit-pcb-tune``: search the per-model ``weight`` of a linear merge config.

A thin command over :func:`mergekit_pcb.tune.job.tune`: it parses the options,
builds the objective (``objective_options.py``), and prints the result. Defaults are
:class:`~mergekit_pcb.tune.search.SearchSettings`'s.

``--help``, ``--version`` and the config errors that need no mergekit answer before
torch and mergekit are imported (the job's modules are imported once they pass).
Ctrl-C ends the command with one line saying what was kept and how to resume.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable
from typing import Any

import click

from mergekit_pcb.cli import DEBUG_HELP, reported_errors, version_option
from mergekit_pcb.config_check import read_raw_config
from mergekit_pcb.console import configure_logging
from mergekit_pcb.tune.densities import check_densities
from mergekit_pcb.tune.objective_options import ObjectiveOptions, objective_options
from mergekit_pcb.tune.records import Evaluation
from mergekit_pcb.tune.run_dir import HISTORY_FILE, Row, read_history
from mergekit_pcb.tune.search import SearchSettings
from mergekit_pcb.tune.weight_layout import search_space

DEFAULTS = SearchSettings()


@click.command(
    "mergekit-pcb-tune",
    epilog="Outputs in OUT_DIR: best.yml (run `mergekit-yaml best.yml OUT` for the tuned "
    "model), history.jsonl, summary.json, scores.png. Every evaluation is written as it "
    "ends: after Ctrl-C or a crash, the same command resumes where the run stopped, and a "
    "larger --budget extends a finished run.",
)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@objective_options
@click.option(
    "--start",
    type=float,
    default=DEFAULTS.start,
    help="one common start weight for every model  [default: the config's weights]",
)
@click.option(
    "--lower-factor",
    type=float,
    default=DEFAULTS.lower_factor,
    show_default=True,
    help="lower edge of the per-model box, as a multiple of the best scaled start",
)
@click.option(
    "--upper-factor",
    type=float,
    default=DEFAULTS.upper_factor,
    show_default=True,
    help="upper edge of the per-model box, as a multiple of the best scaled start",
)
@click.option(
    "--lower",
    type=float,
    default=DEFAULTS.lower,
    help="absolute lower bound of every weight (with --upper; replaces the relative box "
    "and the scale search)",
)
@click.option(
    "--upper", type=float, default=DEFAULTS.upper, help="absolute upper bound (with --lower)"
)
@click.option(
    "--scale-search/--no-scale-search",
    default=DEFAULTS.scale_search,
    show_default=True,
    help="first search a common scale of the start weights (9 evaluations)",
)
@click.option(
    "--scale-min",
    type=float,
    default=DEFAULTS.scale_min,
    show_default=True,
    help="smallest common scale tried",
)
@click.option(
    "--scale-max",
    type=float,
    default=DEFAULTS.scale_max,
    show_default=True,
    help="largest common scale tried",
)
@click.option(
    "--sigma0",
    type=float,
    default=DEFAULTS.sigma0,
    show_default=True,
    help="initial CMA-ES step, in units of the start (absolute with --lower/--upper)",
)
@click.option("--popsize", type=int, default=DEFAULTS.popsize, help="default: 4 + 3 ln(n)")
@click.option(
    "--budget",
    type=int,
    default=DEFAULTS.budget,
    show_default=True,
    help="evaluations, the starting point included; a larger one extends a finished run",
)
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="CMA-ES seed")
@click.option(
    "--layer-points",
    type=click.IntRange(min=1),
    default=None,
    help="search each model's weight as a K-point gradient over the layers instead of one "
    "number (mergekit reads layer l of L at l/(L-1) between the points, and the "
    "embeddings, final norm and lm_head at the first point); K = the number of layers "
    "gives every layer its own weight. Applies to weights written as one number; a "
    "config's own gradients and filters are always searched as written",
)
@click.option(
    "--module-groups",
    default=None,
    metavar="NAME,NAME",
    help="search each model's weight per group of tensors: mergekit gives a tensor the "
    "value of the first group whose name is part of the tensor's name (e.g. self_attn,mlp), "
    "and the others a rest value, searched too",
)
@click.option(
    "--densities",
    default=None,
    metavar="D,D,...",
    help="pcb only: run the weight search at each density (fraction of each task vector "
    "kept), each with an equal share of --budget, and keep the best on validation; each "
    "density needs its own capture of the contributions (one at a time), in "
    "OUT_DIR/density-D/",
)
@click.option(
    "--contributions",
    type=click.Choice(["auto", "device", "cpu", "disk"]),
    default="auto",
    show_default=True,
    help="where the per-model contributions live; auto: beside their parameters while "
    "they fit, then CPU memory, then disk",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="device of the live model and the capture: auto (a GPU if any), cpu, cuda, cuda:N",
)
@click.option(
    "--device-map",
    default=None,
    help="spread the live model over several GPUs with accelerate (e.g. auto)",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="evaluate each generation's candidates in parallel on N Ray actors, one GPU each "
    "where the cluster has GPUs, else one CPU each (needs Ray: pip install 'ray[default]>=2.9'); "
    "the driver's own copy (capture, test scores) stays on --device  [default: no Ray]",
)
@click.option(
    "--ray-address",
    default=None,
    help="with --workers: join this Ray cluster  [default: start a local one for the run]",
)
@click.option("--write-model", is_flag=True, help="also merge best.yml into OUT_DIR/merged")
@click.option("--quiet", is_flag=True, help="no progress bars, warnings only")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@version_option
def main(
    config_file: str,
    out_dir: str,
    objective_spec: ObjectiveOptions,
    start: float | None,
    lower_factor: float,
    upper_factor: float,
    lower: float | None,
    upper: float | None,
    scale_search: bool,
    scale_min: float,
    scale_max: float,
    sigma0: float,
    popsize: int | None,
    budget: int,
    seed: int,
    layer_points: int | None,
    module_groups: str | None,
    densities: str | None,
    contributions: str,
    device: str,
    device_map: str | None,
    workers: int | None,
    ray_address: str | None,
    write_model: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Tune the per-model weights of the merge in CONFIG_FILE; write results to OUT_DIR.

    \b
    CONFIG_FILE  a mergekit YAML config whose merge_method is pcb, task_arithmetic or linear
    OUT_DIR      the run's folder, created if missing; rerun the same command on it to resume
    """
    configure_logging(logging.WARNING if quiet else logging.INFO)
    try:
        with reported_errors(debug):
            raw_config = read_raw_config(config_file)
            groups = module_groups.split(",") if module_groups is not None else []
            space = search_space(layer_points, groups)
            density_values = check_densities(_numbers("--densities", densities))
            settings = SearchSettings(
                start=start,
                lower=lower,
                upper=upper,
                lower_factor=lower_factor,
                upper_factor=upper_factor,
                scale_search=scale_search,
                scale_min=scale_min,
                scale_max=scale_max,
                sigma0=sigma0,
                popsize=popsize,
                budget=budget,
                seed=seed,
            )
            # The job needs torch, mergekit and transformers: seconds of imports, paid
            # once the checks above have passed.
            from mergekit_pcb.tune.job import tune
            from mergekit_pcb.tune.parallel import ray_workers

            objective, test_objective = objective_spec.build()
            with ray_workers(workers, objective, ray_address) as make:
                result = tune(
                    raw_config,
                    out_dir,
                    objective,
                    settings,
                    identity_objective=objective_spec.identity(),
                    test_objective=test_objective,
                    contributions=contributions,
                    device=device,
                    device_map=device_map,
                    write_model=write_model,
                    quiet=quiet,
                    make_evaluator=make,
                    **space,
                    densities=density_values,
                )
    except KeyboardInterrupt:
        click.echo(interrupted_line(out_dir), err=True)
        raise click.exceptions.Exit(130) from None
    direction = "higher" if objective.maximize else "lower"
    for entry in result.densities:
        test = entry.get("test_scores", {}).get("best")
        tested = "" if test is None else f" test {test!s:<12}"
        click.echo(
            f"density {entry['density']:<5g} best score {entry['best_score']!s:<12}{tested}"
            f" over {entry['evaluations']} evaluations"
        )
    resumed = result.search.resumed
    replayed = f" ({resumed} of them resumed from {HISTORY_FILE})" if resumed else ""
    click.echo(
        f"{objective.name} ({direction} is better) over {len(result.history)} evaluations"
        + replayed
    )
    for label, e in (("start", result.start), ("best", result.best)):
        weights = ", ".join(f"{w:.4f}" for w in e.weights)
        test = result.test_scores.get(label)
        tested = "" if test is None else f" test {test!s:<12}"
        click.echo(f"  {label:<5} score {e.score!s:<12}{tested} weights [{weights}]")
    for hit in result.search.on_bound:
        click.echo(f"  note: {hit.message()}")
    click.echo(f"best config: {os.path.join(out_dir, 'best.yml')}")


def _numbers(option: str, text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected numbers separated by commas, got {text!r}", param_hint=option
        ) from None


def interrupted_line(
    out_dir: str, parse: Callable[[dict[str, Any]], Row] = Evaluation.from_row
) -> str:
    """What Ctrl-C leaves: the evaluations kept (rows read by ``parse``), and how to go on."""
    path = os.path.join(out_dir, HISTORY_FILE)
    paths = [
        path,
        *sorted(glob.glob(os.path.join(glob.escape(out_dir), "density-*", HISTORY_FILE))),
    ]
    if len(paths) > 1:  # the tuner's --densities: a history per density
        path = os.path.join(out_dir, "density-*", HISTORY_FILE)
    kept = sum(len(read_history(p, parse)) for p in paths)  # {} for a history not yet written
    if not kept:
        return "Interrupted before any evaluation finished; nothing to resume."
    return (
        f"Interrupted: {kept} evaluations kept in {path}; run the same command again to "
        "resume from them."
    )


if __name__ == "__main__":
    main()
