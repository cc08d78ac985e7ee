"""``fsmoe demo``: train a tiny MoE decoder with backend="fsmoe" and eagerly, side by side, on local ranks.

Each rank builds the same model twice from one seed (experts split over the
ranks), trains one copy eagerly and one through ``torch.compile(backend="fsmoe")``
on the same batches, and sums the dense gradients over the ranks by hand (the
expert gradients already live on their owner). The per-step losses of the two
copies must agree; rank 0 also returns the regions table of the compiled copy.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from tabulate import tabulate

EXAMPLES = {
    "mixtral": "fsmoe_compiler.examples.mixtral_moe",
    "gpt2": "fsmoe_compiler.examples.gpt2_moe",
}


def example_module(name: str) -> ModuleType:
    """The example model module called ``name``; ValueError naming the valid ones otherwise."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example model {name!r}; valid models: {', '.join(sorted(EXAMPLES))}")
    return importlib.import_module(EXAMPLES[name])


def _overrides(dispatch: str | None, router: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dispatch is not None:
        out["dispatch"] = dispatch
    if router is not None:
        out["router"] = router
    return out


def build_example(
    name: str, dispatch: str | None = None, router: str | None = None, seed: int = 0
) -> tuple[torch.nn.Module, tuple]:
    """An example model and one batch ``(idx, targets)`` for it: ``model(*inputs)`` is the loss."""
    mod = example_module(name)
    torch.manual_seed(seed)
    model = mod.build_model(**_overrides(dispatch, router))
    return model, tuple(mod.make_batch(seed=seed))


def _is_expert_param(model: torch.nn.Module) -> dict[int, bool]:
    from fsmoe_compiler.moe.experts import Experts

    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    return {id(p): id(p) in expert_ids for p in model.parameters()}


def _sync_dense_grads(model: torch.nn.Module, is_expert: dict[int, bool]) -> None:
    """Sum dense gradients over ranks: each rank's loss is one term of the global loss."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in model.parameters():
        if p.grad is not None and not is_expert[id(p)]:
            dist.all_reduce(p.grad)


def _global(value: torch.Tensor) -> float:
    t = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t)


def train_side_by_side(
    rank: int, world_size: int, model_name: str, dispatch: str | None, steps: int, lr: float = 0.05
) -> dict[str, Any]:
    """Train the example eagerly and compiled with fsmoe from the same weights; return both loss curves."""
    import fsmoe_compiler

    mod = example_module(model_name)
    torch.manual_seed(0)
    eager = mod.build_model(**_overrides(dispatch, None))
    torch.manual_seed(0)
    fs = mod.build_model(**_overrides(dispatch, None))
    compiled = torch.compile(fs, backend="fsmoe")
    is_expert = _is_expert_param(eager)
    is_expert.update(_is_expert_param(fs))
    opt_e = torch.optim.SGD(eager.parameters(), lr=lr)
    opt_f = torch.optim.SGD(fs.parameters(), lr=lr)
    losses: list[tuple[float, float]] = []
    for step in range(steps):
        batch = mod.make_batch(seed=1000 * step + rank)
        row = []
        for model, runner, opt in ((eager, eager, opt_e), (fs, compiled, opt_f)):
            opt.zero_grad(set_to_none=True)
            loss = runner(*batch)  # the examples return the training loss given targets
            loss.backward()
            _sync_dense_grads(model, is_expert)
            opt.step()
            row.append(_global(loss))
        losses.append((row[0], row[1]))
    rep = fsmoe_compiler.report(compiled)
    return {
        "losses": losses,
        "report": rep.render() if rank == 0 else "",
        "regions": (len(rep.regions("forward")), len(rep.regions("backward"))),
        "fallbacks": rep.fallbacks(),
    }


def run_demo(
    ranks: int = 2, steps: int = 5, model: str = "mixtral", dispatch: str | None = None, timeout_s: float = 600.0
) -> bool:
    """Run the side-by-side training on ``ranks`` local gloo ranks and print what happened."""
    from fsmoe_compiler.runtime.launch import run_ranks

    example_module(model)  # fail fast on an unknown name
    print(f"fsmoe demo: {model} MoE decoder, {ranks} gloo rank(s) on 127.0.0.1, {steps} steps, "
          f"experts split over the ranks; eager and backend='fsmoe' from the same weights")
    results = run_ranks(train_side_by_side, ranks, (model, dispatch, steps), timeout_s=timeout_s)
    first = results[0]
    print(first["report"])
    rows, worst = [], 0.0
    for step, (le, lf) in enumerate(first["losses"]):
        diff = abs(le - lf)
        worst = max(worst, diff / max(abs(le), 1e-12))
        rows.append([step, f"{le:.6f}", f"{lf:.6f}", f"{diff:.2e}"])
    print(tabulate(rows, headers=["step", "eager loss", "fsmoe loss", "|diff|"], tablefmt="simple"))
    ok = worst <= 1e-4 and all(math.isfinite(a) for a, _ in first["losses"])
    for r, res in enumerate(results):
        for f in res["fallbacks"]:
            print(f"rank {r} fallback: {f}")
    print(f"losses summed over {ranks} rank(s); largest relative difference {worst:.2e}: "
          + ("fsmoe matches eager step by step" if ok else "MISMATCH between fsmoe and eager"))
    return ok
