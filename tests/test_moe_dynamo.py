"""Every router x dispatch x expert combination traces with zero Dynamo graph breaks (one process)."""

from __future__ import annotations

import pytest
import torch

from fsmoe_compiler.moe import DISPATCHERS, ROUTERS, MoELayer
from fsmoe_compiler.moe.layer import CAPACITY_ONLY_ROUTERS

COMBOS = [
    (router, dispatch)
    for router in ROUTERS
    for dispatch in DISPATCHERS
    if not (router in CAPACITY_ONLY_ROUTERS and dispatch != "capacity")
]


def test_every_router_is_covered():
    assert {r for r, _ in COMBOS} == set(ROUTERS) and len(COMBOS) == 14


@pytest.mark.parametrize("router, dispatch", COMBOS)
def test_zero_graph_breaks(router, dispatch):
    # alternate the expert kind over the matrix: both kinds meet every dispatch, at half the cost
    expert, shared = (("gelu", False), ("swiglu", True))[COMBOS.index((router, dispatch)) % 2]
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router=router, dispatch=dispatch, expert=expert, shared_expert=shared)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 6, 16))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_dropless_split_sizes_are_traced_as_unbacked_symints():
    """The per-expert sizes come from .tolist() inside the graph (capture_scalar_outputs), not a break."""
    assert torch._dynamo.config.capture_scalar_outputs is True
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layer = MoELayer(16, 32, 4, router="mixtral", dispatch="dropless")
    torch._dynamo.reset()
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(10, 16))
    assert len(graphs) == 1
    code = graphs[0].code
    assert "tolist" in code or "item" in code or "_local_scalar_dense" in code, code
