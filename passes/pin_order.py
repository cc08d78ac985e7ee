"""Pin a scheduled graph's order for Inductor: control dependencies around every collective and wait.

Inductor fuses kernels and orders them itself; left alone it may issue a
collective after the compute it was scheduled to overlap, or wait for it
before. PyTorch's overlap scheduler pins its own order the same way
(``torch._inductor.fx_passes.control_dependencies.preserve_node_ordering``):
each dependency becomes a ``control_deps`` call that Inductor's scheduler
honours. Only nodes that get a kernel of their own are tied (matmuls, ops
Inductor falls back on, the collectives and waits), so pinning forces no
pointwise op to materialise and fusion inside a stretch between two
communication ops is untouched. Per stretch of compute between communication
ops ``c_k`` and ``c_k+1``: each kernel node in it depends on ``c_k`` (it cannot
run before the collective is issued or waited), ``c_k+1`` depends on each of
them (it cannot be issued or waited before they run), and the communication
ops depend on each other in order (every rank issues them alike).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fsmoe_compiler.ops import is_communication
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.graph_utils import val

aten = torch.ops.aten

#: Ops Inductor lowers to a kernel of their own (an extern call or a template), never fused into a neighbour.
_KERNEL_PACKETS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_int_mm", "convolution",
                   "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                   "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention")
KERNEL_OPS = frozenset(getattr(aten, name) for name in _KERNEL_PACKETS if hasattr(aten, name))
#: Kernel ops never wrapped in ``control_deps`` themselves (they are still what the next communication op waits
#: for): inside the wrapper Inductor lays out ``_grouped_mm``'s operands without the 16-byte strides the kernel
#: needs ("strides should be multiple of 16 bytes" at run time, torchtitan's layer in bf16).
UNWRAPPED = frozenset(getattr(aten, name) for name in ("_grouped_mm", "_scaled_grouped_mm") if hasattr(aten, name))


def own_kernel(node: fx.Node) -> bool:
    """Whether Inductor runs ``node`` as a kernel of its own: a matmul-like op or an op it has no lowering
    for (a fallback), with one tensor output. Such nodes are realised anyway, so tying them costs no fusion."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if is_communication(node) or node.target.is_view or not isinstance(val(node), torch.Tensor):
        return False
    if node.target.overloadpacket in KERNEL_OPS:
        return True
    from torch._inductor import lowering
    from torch._inductor.decomposition import select_decomp_table

    if node.target in select_decomp_table():  # Inductor decomposes it first: into ops it fuses
        return False
    lowered = node.target in lowering.lowerings or node.target.overloadpacket in lowering.lowerings
    return not lowered or node.target in lowering.fallbacks


def order_deps(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """The extra dependencies that keep ``graph``'s order of communication against kernels (see the module
    docstring); every one points forward in the graph's order, so none can make a cycle."""
    deps: dict[fx.Node, list[fx.Node]] = {}
    last_comm: fx.Node | None = None
    stretch: list[fx.Node] = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if is_communication(n):
            before = ([last_comm] if last_comm is not None else []) + stretch
            if before:
                deps[n] = before
            last_comm, stretch = n, []
        elif own_kernel(n):
            stretch.append(n)
            if last_comm is not None and n.target.overloadpacket not in UNWRAPPED:
                deps[n] = [last_comm]
    return deps


@graph_pass()
def pin_order(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Wrap the nodes of :func:`order_deps` in ``control_deps`` so Inductor keeps the order; the graph
    computes the same values. A graph without communication is returned as is."""
    from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
    from torch.utils._ordered_set import OrderedSet

    deps = order_deps(gm.graph)
    if not deps:
        return gm
    preserve_node_ordering(gm.graph, {n: OrderedSet(d) for n, d in deps.items()})
    gm.recompile()
    ctx.notes.append(f"{ctx.graph_kind}: order pinned for Inductor with {sum(map(len, deps.values()))} control "
                     f"dependencies on {len(deps)} nodes")
    return gm
