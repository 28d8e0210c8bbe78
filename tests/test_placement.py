"""Where contributions live (``placement.py``): budgets per device, the choice within
them, and the one way both the capture and a Ray worker put a tensor's terms there."""

from __future__ import annotations

import torch

from mergekit_pcb.tune.compact import compact
from mergekit_pcb.tune.contributions import DiskStore, TensorTerms
from mergekit_pcb.tune.placement import Placement, place, placement_for


def test_placement_beside_the_parameter_then_cpu_then_disk():
    placement = Placement("auto", {"cuda:0": 100, "cuda:1": 10, "cpu": 50})
    assert [
        placement.choose(n, d) for n, d in [(60, "cuda:0"), (30, "cuda:0"), (20, "cuda:1")]
    ] == [
        "cuda:0",
        "cuda:0",
        "cpu",
    ]
    assert placement.choose(40, "cuda:0") == "disk"  # 10 left on cuda:0, 30 on the CPU
    assert placement.choose(30, "cpu") == "cpu"
    assert dict(placement.used) == {"cuda:0": 90, "cpu": 50, "disk": 40}
    assert Placement("device").choose(10**15, "cuda:3") == "cuda:3"
    assert Placement("cpu").choose(1, "cuda:0") == "cpu"
    assert Placement("disk").choose(1, "cpu") == "disk"


def test_auto_placement_leaves_room_for_the_objective_on_each_gpu():
    gib = 2**30
    fake = {
        "cuda:0": (60 * gib, 80 * gib),
        "cuda:1": (10 * gib, 80 * gib),
        "cpu": (8 * gib, 16 * gib),
    }
    placement = placement_for("auto", ["cuda:0", "cuda:1"], memory=lambda d: fake[str(d)])
    # 25% of each GPU's 80 GiB stays free for the objective.
    assert placement.budgets == {"cuda:0": 40 * gib, "cuda:1": 0, "cpu": 8 * gib}
    assert placement.choose(30 * gib, "cuda:0") == "cuda:0"
    assert placement.choose(1 * gib, "cuda:1") == "cpu"
    assert placement.choose(20 * gib, "cuda:0") == "disk"  # 10 GiB left there, 7 on the CPU
    assert "left free on cuda:0" in placement.describe()



def _terms() -> TensorTerms:
    """A tensor of 1000 entries: a float32 base (4000 bytes) and one row keeping every
    fifth entry (200 x (1 byte of position + 4 of value) = 1000 bytes)."""
    row = torch.zeros(1000)
    row[::5] = 1.0
    base = torch.arange(1000, dtype=torch.float32)
    return TensorTerms(torch.Size([10, 100]), base, 1.0, (0,), {0: compact(row)})


def test_the_base_is_placed_and_counted_with_its_rows():
    terms = _terms()
    assert terms.stored_bytes == 4000 + 1000
    placement = Placement("auto", {"cpu": 5000})
    placed = place(placement, "w", terms, "cpu", None, copy=True)
    assert dict(placement.used) == {"cpu": 5000} and placement.budgets == {"cpu": 0}
    # One byte more than the budget left: the next tensor goes to disk.
    assert Placement("auto", {"cpu": 4999}).choose(terms.stored_bytes, "cpu") == "disk"
    assert torch.equal(placed.base, terms.base) and not placed.on_disk


def test_the_capture_copies_the_base_and_a_worker_keeps_its_own():
    """The capture's base is mergekit's tensor (copied); a worker's payload is its own."""
    terms = _terms()
    copied = place(Placement("cpu"), "w", terms, "cpu", None, copy=True)
    kept = place(Placement("cpu"), "w", terms, "cpu", None, copy=False)
    assert copied.base.data_ptr() != terms.base.data_ptr()
    assert torch.equal(copied.base, terms.base)
    assert kept.base.data_ptr() == terms.base.data_ptr()
    assert kept.rows[0].values.data_ptr() == terms.rows[0].values.data_ptr()


def test_terms_placed_on_disk_go_into_the_store_or_stay_without_one(tmp_path):
    terms = _terms()
    store = DiskStore(str(tmp_path / "cache"))
    on_disk = place(Placement("disk"), "w", terms, "cpu", store, copy=True)
    assert on_disk.on_disk and on_disk.base.device.type == "meta"
    store.flush()
    loaded = store.load("w", on_disk, torch.device("cpu"))
    assert torch.equal(loaded.base, terms.base)
    assert torch.equal(loaded.rows[0].dense(), terms.rows[0].dense())
    # A worker writes no shards: terms it would put on disk stay in its memory.
    assert place(Placement("disk"), "w", terms, "cpu", None, copy=False) is terms
    # Terms already on disk stay there, and take no budget.
    placement = Placement("auto", {"cpu": 10})
    assert place(placement, "w", on_disk, "cpu", None, copy=False) is on_disk
    assert not placement.used
