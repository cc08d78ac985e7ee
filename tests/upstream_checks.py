"""What every upstream-library test compares: a step's values against eager, and the facts of the regions found."""

from __future__ import annotations

from typing import Iterable

import torch

RTOL, ATOL = 1e-4, 1e-5
KINDS = ("forward", "backward")
CORE_ROLES = ("router", "dispatch", "expert", "combine")


def grad_differences(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """The values (loss, input and parameter gradients) that differ beyond the tolerance, with the worst gap."""
    assert ref.keys() == got.keys(), f"gradients of different parameters: {sorted(ref.keys() ^ got.keys())}"
    return {k: float((got[k] - ref[k]).abs().max()) for k in ref
            if not torch.allclose(got[k], ref[k], rtol=RTOL, atol=ATOL)}


def assert_every_step_equal(res: dict, where: str) -> None:
    """A rank's result of a multi-rank job: every step's values equal eager's, and no graph fell back."""
    for step, bad in enumerate(res["bad"]):
        assert not bad, f"{where} step {step}: fsmoe differs from eager: {bad}"
    assert res["fallbacks"] == [], f"{where}: {res['fallbacks']}"


def region_facts(region, keys: Iterable[str]) -> dict:
    """The named facts of a found region, comparable with a case's expected facts."""
    every = {"router": region.router, "top_k": region.top_k, "num_experts": region.num_experts,
             "capacity": region.capacity, "dropless": region.dropless, "hidden": region.hidden,
             "shared_expert": bool(region.nodes.get("shared_expert")),
             "roles": all(region.nodes[role] for role in CORE_ROLES), "layer": region.layer}
    return {k: every[k] for k in keys}


def regions_by_kind(rep, keys: Iterable[str]) -> dict[str, list[dict]]:
    """The facts of every region of a report, per graph kind, in layer order."""
    keys = tuple(keys)
    return {kind: [region_facts(r, keys) for r in rep.regions(kind)] for kind in KINDS}
