"""Capture the forward and backward ATen graphs that aot_autograd produces for a module.

The capture compiler stores each graph module it is given and returns its
``forward`` unchanged (boxed, as aot_autograd calls it), so the model still
runs eagerly-equivalent code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func


@dataclass
class CapturedGraphs:
    """Graph modules seen by the forward and backward compilers, in call order."""

    forward: list[torch.fx.GraphModule] = field(default_factory=list)
    backward: list[torch.fx.GraphModule] = field(default_factory=list)


def capture_backend() -> tuple[Callable, CapturedGraphs]:
    """A torch.compile backend that records the ATen graphs, and where it records them."""
    graphs = CapturedGraphs()

    def _store(kind: str) -> Callable:
        def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
            getattr(graphs, kind).append(gm)
            return make_boxed_func(gm.forward)  # gm.forward, taking aot_autograd's boxed argument list

        return compiler

    backend = aot_autograd(fw_compiler=_store("forward"), bw_compiler=_store("backward"))
    return backend, graphs


def capture_graphs(
    model: torch.nn.Module, *inputs: torch.Tensor, backward: bool = True, dynamic: bool | None = False,
    fullgraph: bool = True,
) -> CapturedGraphs:
    """Compile ``model``, run it once on ``inputs`` (and backward through the sum), return the graphs.

    Data-dependent shapes (``nonzero``, ``.tolist()`` split sizes) are captured
    into the graph instead of breaking it, as MoE code needs.
    """
    torch._dynamo.reset()
    backend, graphs = capture_backend()
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        out = compiled(*inputs)
        if isinstance(out, tuple):
            out = out[0]
        if backward:
            (out.float() * torch.randn_like(out.float())).sum().backward()
    return graphs
