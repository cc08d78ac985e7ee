"""``fsmoe demo``: train a tiny MoE decoder with backend="fsmoe" and eagerly, side by side, on local ranks.

Each rank builds the same model twice from one seed (experts split over the
ranks), trains one copy eagerly and one through ``torch.compile(backend="fsmoe")``
on the same batches (data parallel for the dense weights, expert parallel for
the experts). The per-step losses of the two copies, averaged over ranks, must
agree; rank 0 also returns the regions table of the compiled copy.
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
    "torchtitan": "fsmoe_compiler.examples.titan_moe",  # torchtitan's MoE layer (the ecosystem extra)
    # the same layer DeepSeek-V3-style: sigmoid scores, group-limited routing, a shared expert (MODEL_PRESETS)
    "torchtitan_dsv3": "fsmoe_compiler.examples.titan_moe",
}


#: Example names that are another's module with fixed options (``build_model`` overrides, before the caller's).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "torchtitan_dsv3": {"score_func": "sigmoid", "num_expert_groups": 4, "num_limited_groups": 2,
                        "shared_expert": True},
}


def example_module(name: str) -> ModuleType:
    """The example model module called ``name``; ValueError naming the valid ones otherwise."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example model {name!r}; valid models: {', '.join(sorted(EXAMPLES))}")
    return importlib.import_module(EXAMPLES[name])


def model_options(name: str, dispatch: str | None = None, router: str | None = None) -> dict[str, Any]:
    """``build_model`` keyword arguments for example ``name``: its preset (``MODEL_PRESETS``), then the caller's
    dispatch and router where given."""
    out: dict[str, Any] = dict(MODEL_PRESETS.get(name, {}))
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
    model = mod.build_model(**model_options(name, dispatch, router))
    return model, tuple(mod.make_batch(seed=seed))


def _mean_over_ranks(value: torch.Tensor) -> float:
    t = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def train_side_by_side(
    rank: int, world_size: int, model_name: str, dispatch: str | None, steps: int, lr: float = 0.05
) -> dict[str, Any]:
    """Train the example eagerly and compiled with fsmoe from the same weights; return both loss curves."""
    import fsmoe_compiler
    from fsmoe_compiler.moe.parallel import sync_gradients

    mod = example_module(model_name)
    options = model_options(model_name, dispatch)  # with its preset: torchtitan_dsv3 is sigmoid, group-limited
    torch.manual_seed(0)
    eager = mod.build_model(**options)
    torch.manual_seed(0)
    fs = mod.build_model(**options)
    compiled = torch.compile(fs, backend="fsmoe")
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
            sync_gradients(model)  # gradient of the mean loss over ranks (dense all-reduce)
            opt.step()
            row.append(_mean_over_ranks(loss))
        losses.append((row[0], row[1]))
    rep = fsmoe_compiler.report(compiled)
    return {
        "losses": losses,
        "report": rep.render() if rank == 0 else "",
        "regions": (len(rep.regions("forward")), len(rep.regions("backward"))),
        "fallbacks": rep.fallbacks(),
    }


#: Scheduled steps the demo's default run ends with: the report's measurement is the median of their calls.
SCHEDULED_STEPS = 8


def default_steps() -> int:
    """Enough steps for the default options to reach the scheduled graphs and run them: a warm-up call, the
    profiling calls, the measured call, then ``SCHEDULED_STEPS`` scheduled steps (so the report shows the schedule
    and predicted against measured over several calls, not one)."""
    from fsmoe_compiler.config import FSMoEConfig

    defaults = FSMoEConfig()
    return 1 + defaults.profile_steps + defaults.measure_steps + SCHEDULED_STEPS


def run_demo(
    ranks: int = 2, steps: int | None = None, model: str = "mixtral", dispatch: str | None = None,
    timeout_s: float = 600.0,
) -> bool:
    """Run the side-by-side training on ``ranks`` local gloo ranks (``steps``: ``default_steps()``) and print
    what happened."""
    from fsmoe_compiler.launch import run_ranks

    steps = default_steps() if steps is None else steps

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
    print(f"losses averaged over {ranks} rank(s); largest relative difference {worst:.2e}: "
          + ("fsmoe matches eager step by step" if ok else "MISMATCH between fsmoe and eager"))
    return ok
