"""Pins every private part of mergekit that ``_mergekit_compat`` uses.

If a mergekit upgrade moves or changes one of them, the failure lands here, naming it,
rather than somewhere in a merge or a tuning run.
"""

from __future__ import annotations

import os

import pytest
import torch
from mergekit import merge_methods
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from mergekit_pcb import _mergekit_compat as compat
from mergekit_pcb.merge import load_config
from tests.conftest import write_config


@pytest.fixture(scope="module")
def config(tiny_models, tmp_path_factory):
    path = write_config(str(tmp_path_factory.mktemp("compat") / "pcb.yml"), tiny_models)
    return load_config(path)[0]


def test_parameter_spec_is_mergekits_own():
    from mergekit.merge_methods.base import ParameterSpec

    assert compat.ParameterSpec is ParameterSpec
    spec = compat.ParameterSpec("lambda", float, merge_methods.ParameterScope.SHARED, default=1.0)
    assert spec.validate(2) == 2.0 and not spec.required


def test_plan_tensor_tasks_names_every_tensor_of_the_model(config, tiny_models):
    from safetensors import safe_open

    planned = compat.plan_tensor_tasks(config, MergeOptions(quiet=True))
    path = os.path.join(tiny_models["base"], "model.safetensors")
    with safe_open(path, framework="pt") as file:
        stored = set(file.keys())
    assert {name for name, _task in planned} == stored
    # mergekit 0.1.5's public plan_in_memory() fails; the fallback must stay needed or
    # become unnecessary, never silently different.
    from mergekit.architecture import get_architecture_info
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    options = MergeOptions(quiet=True)
    copy = config.model_copy(deep=True)
    arch = get_architecture_info(copy, options)
    out_config = _model_out_config(copy, arch)
    try:
        planner = MergePlanner(copy, arch, options=options, out_model_config=out_config)
        public = [r.weight_info.name for r in planner.plan_in_memory()]
    except TypeError:
        planner = MergePlanner(copy, arch, options=options, out_model_config=out_config)
        planner._plan()
        assert [w.name for w, _task in planner._tensors] == [n for n, _ in planned]
    else:
        assert public == [n for n, _ in planned]


def test_loader_internals(config, tiny_models):
    compat.setup_loaders(MergeOptions(quiet=True))
    loaders = [compat.tensor_loader(ModelReference.parse(p)) for p in tiny_models.values()]
    names = compat.shared_tensor_names(loaders)
    assert "model.norm.weight" in names and len(names) == len(set(names))
    files = list(compat.checkpoint_files(loaders[0]))
    assert files == [os.path.join(tiny_models["base"], "model.safetensors")]
    tensor = compat.load_tensor(loaders[0], "model.norm.weight", "cpu")
    assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"


def test_unregister_method_removes_a_registered_method():
    class Probe(merge_methods.GroupMergeMethod):
        spec = merge_methods.MergeMethodSpec(name="_mergekit_pcb_compat_probe")

        def merge_group(self, group, /, **parameters):
            return group.entries[0].tensor

    merge_methods.register(Probe())
    assert merge_methods.get("_mergekit_pcb_compat_probe")
    compat.unregister_method("_mergekit_pcb_compat_probe")
    with pytest.raises(RuntimeError, match="Unimplemented merge method"):
        merge_methods.get("_mergekit_pcb_compat_probe")


def test_plan_saved_tensors_in_the_order_run_merge_merges(config, tmp_path, monkeypatch):
    from mergekit.merge import run_merge
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    options = MergeOptions(quiet=True)
    saved = compat.plan_saved_tensors(config, options)
    assert not os.path.exists("<not written>")
    merged: list[str] = []
    execute = ExecuteMergeMethodTask.execute

    def recording(self, **kwargs):
        merged.append(self.output_weight.name)
        return execute(self, **kwargs)

    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", recording)
    run_merge(config, str(tmp_path / "merged"), options)
    assert [s.tensor_name for s in saved] == merged
    assert all(isinstance(s.tensor_task, ExecuteMergeMethodTask) for s in saved)


def test_stored_name_resolves_as_the_loader_does(config, tiny_models):
    from mergekit.io.tasks import LoadTensor

    options = MergeOptions(quiet=True)
    compat.setup_loaders(options)
    task = compat.plan_saved_tensors(config, options)[0].tensor_task
    for load in task.gather_tensors.arguments().values():
        loader = compat.tensor_loader(load.model)
        assert compat.stored_name(load, loader) == load.tensor
    ref = ModelReference.parse(tiny_models["math"])
    loader = compat.tensor_loader(ref)
    aliased = LoadTensor(model=ref, tensor="no.such.weight", aliases=("model.norm.weight",))
    assert compat.stored_name(aliased, loader) == "model.norm.weight"
    assert compat.stored_name(LoadTensor(model=ref, tensor="no.such.weight"), loader) is None
