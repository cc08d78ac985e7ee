"""``explain(model, *inputs)`` and ``report(compiled)``: what the backend found, as tables.

``explain`` compiles the model with the fsmoe backend, runs one forward and
(when the output needs gradients) one backward, and restores the parameters'
gradients afterwards. ``report`` reads the records of a model already compiled
with ``backend="fsmoe"`` and run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from fsmoe_compiler import records
from fsmoe_compiler.reporting.tables import regions_table, roles_table


@dataclass
class Explanation:
    """The graphs the fsmoe backend compiled for one model, with their MoE regions."""

    records: list[records.CompileRecord]

    def graphs(self, kind: str | None = None) -> list[records.GraphReport]:
        """The latest graph of each kind per Dynamo graph (recompiles replace older ones)."""
        out = []
        for rec in self.records:
            for k in ("forward", "backward"):
                g = rec.latest(k)
                if g is not None and (kind is None or k == kind):
                    out.append(g)
        return out

    def regions(self, kind: str = "forward") -> list:
        """All MoE regions found in graphs of ``kind``."""
        return [r for g in self.graphs(kind) for r in g.regions]

    def fallbacks(self) -> list[str]:
        return [f"{g.kind}: {g.fallback}" for g in self.graphs() if g.fallback]

    def render(self, max_names: int | None = 8) -> str:
        if not self.records:
            return "fsmoe: no graph of this model was compiled with the fsmoe backend (run it once first)."
        parts = []
        multi = len(self.records) > 1
        for i, rec in enumerate(self.records):
            for kind in ("forward", "backward"):
                g = rec.latest(kind)
                if g is None:
                    continue
                title = f"{kind} graph" + (f" (Dynamo graph {i})" if multi else "")
                parts.append(f"== {title}: {g.num_nodes} nodes, {len(g.regions)} MoE region(s)")
                if g.fallback:
                    parts.append(f"fallback to the unmodified graph: {g.fallback}")
                for note in g.notes:
                    parts.append(f"note: {note}")
                if g.regions:
                    parts.append(regions_table(g.regions))
                    parts.append("")
                    parts.append(roles_table(g.regions, max_names=max_names))
                parts.append("")
        return "\n".join(parts).rstrip() + "\n"

    def __str__(self) -> str:
        return self.render()


def explain(
    model: torch.nn.Module, *inputs: Any, options: Any = None, backward: bool = True, quiet: bool = False
) -> Explanation:
    """Compile ``model`` with the fsmoe backend, run it on ``inputs``, print and return what was found.

    ``backward=False`` skips the backward graph; ``quiet=True`` only returns.
    """
    from fsmoe_compiler.backend import fsmoe_backend

    before = len(records._RECORDS)
    compiled = torch.compile(model, backend=fsmoe_backend, options=options)
    saved = {p: p.grad for p in model.parameters()}
    try:
        out = compiled(*inputs)
        leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if backward and leaves:
            torch.autograd.backward([t.float().sum() for t in leaves])
    finally:
        for p, g in saved.items():
            p.grad = g
    result = Explanation(records._RECORDS[before:])
    if not quiet:
        print(result.render(), end="")
    return result


def report(compiled: torch.nn.Module) -> Explanation:
    """What the fsmoe backend found in a model compiled with ``backend="fsmoe"`` (after it ran)."""
    if not isinstance(compiled, torch.nn.Module):
        raise TypeError(f"report() takes the compiled nn.Module, got {type(compiled).__name__}")
    return Explanation(records.records_for(compiled))
