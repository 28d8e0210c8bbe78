"""Make tiny models, merge them with ``pcb`` through plain ``mergekit-yaml``, show the result.

Run from the repository root (``bash scripts/run-example.sh`` sets everything up):

    python examples/run_example.py

It writes a base model and three synthetic fine-tunes to ``examples/output/models``,
runs ``mergekit-yaml examples/pcb.yml examples/output/merged`` as a separate process
(the start-up hook installed with the package registers ``pcb`` there), loads the
merged model with transformers, and prints how it relates to its inputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import click
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_pcb.synthetic import write_tiny_models

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _flat_state(path: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}


@click.command()
@click.option("--config", default=os.path.join(HERE, "pcb.yml"), show_default=True)
@click.option("--out", default=os.path.join(HERE, "output", "merged"), show_default=True)
def main(config: str, out: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.chdir(ROOT)  # the config's model paths are relative to the repository root
    paths = write_tiny_models(os.path.join("examples", "output", "models"))
    if os.path.exists(out):
        shutil.rmtree(out)
    mergekit_yaml = shutil.which("mergekit-yaml") or os.path.join(
        os.path.dirname(sys.executable), "mergekit-yaml"
    )
    click.echo(f"$ mergekit-yaml {os.path.relpath(config)} {os.path.relpath(out)}")
    subprocess.run([mergekit_yaml, config, out], check=True)

    base = _flat_state(paths["base"])
    merged = _flat_state(out)
    finetunes = {name: _flat_state(p) for name, p in paths.items() if name != "base"}
    names = sorted(base)

    def task_vector(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(state[n] - base[n]).reshape(-1) for n in names])

    merged_tv = task_vector(merged)
    click.echo("\nMerged task vector against each fine-tune's task vector:")
    click.echo(f"{'model':<8} {'cosine':>8} {'norm ratio':>11}")
    for name, state in finetunes.items():
        tv = task_vector(state)
        cosine = torch.nn.functional.cosine_similarity(merged_tv, tv, dim=0).item()
        click.echo(f"{name:<8} {cosine:>8.3f} {merged_tv.norm().item() / tv.norm().item():>11.3f}")
    changed = (merged_tv != 0).float().mean().item()
    click.echo(
        f"\nparameters changed from the base: {100 * changed:.1f}% ({merged_tv.numel():,} in all)"
    )

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer("merge models, not ensembles", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    click.echo(
        f"transformers loads the merge: {type(model).__name__}, "
        f"logits {tuple(logits.shape)}, all finite: {bool(torch.isfinite(logits).all())}"
    )
    click.echo(f"merged model: {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
