"""``mergekit-pcb-evolve``: evolve the fine-tunes of a merge config before they are merged.

A thin command over :func:`mergekit_pcb.evolve.job.evolve`: it parses the options,
builds the objective with the tuner's own options and code (``objective_options.py``),
and prints the result. Defaults are :class:`~mergekit_pcb.evolve.settings.EvolveSettings`'s.

``--help``, ``--version``, settings out of range and the config errors that need no
mergekit answer before torch and mergekit are imported. Ctrl-C ends the command with one
line saying what was kept and how to resume.
"""

from __future__ import annotations

import logging
import os

import click

from mergekit_pcb.cli import DEBUG_HELP, reported_errors, version_option
from mergekit_pcb.config_check import read_raw_config
from mergekit_pcb.console import configure_logging
from mergekit_pcb.evolve.settings import MODES, EvolveSettings
from mergekit_pcb.tune.objective_options import ObjectiveOptions, objective_options

DEFAULTS = EvolveSettings()


@click.command(
    "mergekit-pcb-evolve",
    epilog="Outputs in OUT_DIR: population/<name>/ (each evolved fine-tune as a model "
    "folder), best.yml (the config over them: `mergekit-yaml best.yml OUT` gives the "
    "evolved merge), history.jsonl, summary.json, scores.png. Every evaluation is written "
    "as it ends: after Ctrl-C or a crash, the same command resumes where the run stopped, "
    "and a larger --generations or --budget extends a finished run.",
)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@objective_options
@click.option(
    "--generations",
    type=int,
    default=DEFAULTS.generations,
    show_default=True,
    help="generations; each makes one offspring per fine-tune",
)
@click.option(
    "--f",
    "f",
    type=float,
    default=DEFAULTS.f,
    show_default=True,
    help="mutation share: a crossed entry moves this share of the way to the partner's",
)
@click.option(
    "--cr",
    type=float,
    default=DEFAULTS.cr,
    show_default=True,
    help="crossover rate: the chance that an entry is crossed, in (0, 1]",
)
@click.option(
    "--seed",
    type=int,
    default=DEFAULTS.seed,
    show_default=True,
    help="seed of every draw (order, partners, masks; mergekit's --random-seed too)",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=DEFAULTS.mode,
    show_default=True,
    help="merged: an offspring is judged by the merge of the population with it; "
    "individual: by itself, and the result is the best individual",
)
@click.option(
    "--budget",
    type=int,
    default=None,
    help="stop after this many evaluations, the start included  [default: all generations]",
)
@click.option(
    "--population",
    "placement",
    type=click.Choice(["auto", "device", "cpu", "disk"]),
    default="auto",
    show_default=True,
    help="where the fine-tunes live; auto: on the live model's device while they fit, "
    "then CPU memory, then disk",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="device of the live model and the merge: auto (a GPU if any), cpu, cuda, cuda:N",
)
@click.option("--write-model", is_flag=True, help="also write the result into OUT_DIR/merged")
@click.option("--quiet", is_flag=True, help="no progress bars, warnings only")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@version_option
def main(
    config_file: str,
    out_dir: str,
    objective_spec: ObjectiveOptions,
    generations: int,
    f: float,
    cr: float,
    seed: int,
    mode: str,
    budget: int | None,
    placement: str,
    device: str,
    write_model: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Evolve the fine-tuned models of CONFIG_FILE by mutation and crossover, keeping an
    offspring when it improves the validation score; write results to OUT_DIR.

    \b
    CONFIG_FILE  a mergekit YAML config with a models: list of two or more fine-tunes
                 (pcb, ties, dare_ties, della, task_arithmetic, linear, ...)
    OUT_DIR      the run's folder, created if missing; rerun the same command on it to resume
    """
    configure_logging(logging.WARNING if quiet else logging.INFO)
    try:
        with reported_errors(debug):
            settings = EvolveSettings(generations, f, cr, seed, mode, budget)
            settings.check()
            raw_config = read_raw_config(config_file, strict=True)
            # The job needs torch, mergekit and transformers: seconds of imports, paid
            # once the checks above have passed.
            from mergekit_pcb.evolve.job import evolve

            objective, test_objective = objective_spec.build()
            result = evolve(
                raw_config,
                out_dir,
                objective,
                settings,
                identity_objective=objective_spec.identity(),
                test_objective=test_objective,
                population=placement,
                device=device,
                write_model=write_model,
                quiet=quiet,
            )
    except KeyboardInterrupt:
        from mergekit_pcb.evolve.records import EvolveRecord
        from mergekit_pcb.tune.cli import interrupted_line

        click.echo(interrupted_line(out_dir, EvolveRecord.from_row), err=True)
        raise click.exceptions.Exit(130) from None
    summary = result.summary
    direction = "higher" if objective.maximize else "lower"
    replayed = f" ({result.resumed} of them resumed)" if result.resumed else ""
    click.echo(
        f"{objective.name} ({direction} is better), {summary['mode']} mode, over "
        f"{len(result.history)} evaluations{replayed}"
    )
    for label, key in (("start", "start"), ("result", "result")):
        entry = summary[key]
        test = entry.get("test_score")
        tested = "" if test is None else f" test {test!s:<12}"
        who = f" individual {entry['individual']}" if "individual" in entry else ""
        click.echo(f"  {label:<6} score {entry['score']!s:<12}{tested}{who}")
    kept = ", ".join(
        f"{os.path.basename(name)} {a['accepted']}/{a['offspring']}"
        for name, a in summary["acceptances"].items()
    )
    click.echo(f"  offspring kept: {kept}")
    click.echo(f"population: {os.path.join(out_dir, 'population')}")
    click.echo(f"best config: {os.path.join(out_dir, 'best.yml')}")


if __name__ == "__main__":
    main()
