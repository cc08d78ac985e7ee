"""Inductor code generation for a graph the backend planned: decompose, pin the order, compile.

With ``codegen="inductor"`` the graph fsmoe chose (the scheduled one, or a
graph with nothing to schedule) runs as the code Inductor generates for it,
with fused kernels, instead of as Python calls of ATen ops. Profiling still
runs the plain variants (cheap to build, timed per node); only the chosen
graph is compiled. Three steps:

* **decompose**: aot_autograd decomposes with Inductor's table when Inductor
  is the backend, and Inductor's lowerings expect that; fsmoe's passes read
  graphs before it. The planned graph is traced again with that table
  (``make_fx`` under the fake mode and tracing context aot_autograd compiled
  the graph in), which keeps its node order.
* **pin** (``passes.pin_order``): control dependencies tie each collective
  and wait to the kernels around it.
* **compile**: Inductor's inner compiler (``compile_fx_inner``), with its own
  communication reordering switched off, whatever the process's config says.

A graph Inductor cannot compile runs as Python code, and the caller says why.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from fsmoe_compiler.ops import collective_op, is_communication
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.pin_order import pin_order

#: Inductor's own passes that move collectives; off so the schedule's order is the one that runs.
_NO_REORDER = {
    "reorder_for_compute_comm_overlap": False,
    "aten_distributed_optimizations.enable_overlap_scheduling": False,
}


@dataclass
class TraceState:
    """What Inductor needs to compile a graph after aot_autograd is done with it: the graph's kind, the
    tracing context (its fake mode and shape environment) and the fake inputs the graph compiler got."""

    kind: str
    tracing: Any
    fake_inputs: list = field(repr=False)

    @property
    def fake_mode(self) -> Any:
        from torch._guards import detect_fake_mode

        return detect_fake_mode(self.fake_inputs)


def capture(kind: str, example_inputs: Sequence[Any]) -> TraceState:
    """The :class:`TraceState` of the graph aot_autograd is compiling now (call from the graph compiler)."""
    return TraceState(kind, torch._guards.TracingContext.try_get(), list(example_inputs))


@dataclass
class InductorGraph:
    """An Inductor-compiled graph: ``fn`` takes the boxed argument list; ``compile_s`` is decomposition,
    pinning and Inductor's compile together; ``pins`` counts the control dependencies added."""

    fn: Callable[[list], Any]
    compile_s: float
    pins: int
    code: str = field(default="", repr=False)


class OrderLost(RuntimeError):
    """Inductor's code does not issue the collectives and waits where the schedule put them."""


class DataDependentSizes(RuntimeError):
    """The graph has sizes known only at run time (a dropless layer's split sizes): Inductor, compiling after the
    fact, checks assumptions about them that the traced graph does not and specialises others; measured here, its
    code then failed at run time ("u0 <= 512", "expected size 1845==1804"). Such graphs run as Python code."""


class SpecializedShapes(RuntimeError):
    """Inductor guarded on a dynamic size while compiling after the fact: no compiled frame checks that guard, so
    its code would assert (or be wrong) at the next size."""


#: Matmul-like ops: in Inductor's code each is one extern call (or template kernel) of the same name.
_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_int_mm")
_EMITTED = re.compile(r"torch\.ops\._c10d_functional\.(\w+)\.default\(|extern_kernels\.(\w+)\("
                      r"|torch\.ops\.aten\.(\w+)\.default\(")


def _stretches(events: Iterable[str | None]) -> list[tuple[str, int]]:
    """Communication ops in order, each with the matmuls counted after it (``None`` in ``events`` is a matmul);
    the first entry, "start", counts those before any communication."""
    out: list[tuple[str, int]] = [("start", 0)]
    for op in events:
        if op is None:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((op, 0))
    return out


def planned_order(graph: fx.Graph) -> list[tuple[str, int]]:
    """The communication ops of ``graph`` in order, each with the number of matmuls between it and the next:
    what the generated code must keep (pointwise work may fuse across, matmuls and communication may not)."""
    events: list[str | None] = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if is_communication(n):
            events.append(collective_op(n))
        elif getattr(getattr(n.target, "overloadpacket", None), "__name__", None) in _MATMULS:
            events.append(None)
    return _stretches(events)


def emitted_order(code: str) -> list[tuple[str, int]]:
    """:func:`planned_order` read off Inductor's output code (its ``call`` function, in order)."""
    matches = (m.groups() for m in _EMITTED.finditer(code.split("def call(", 1)[-1]))
    return _stretches(comm for comm, extern, aten_op in matches if comm is not None or (extern or aten_op) in _MATMULS)


def check_order(planned: list[tuple[str, int]], code: str) -> None:
    """Raise :class:`OrderLost` naming the first place where ``code`` departs from ``planned``: the collectives
    and waits must come in the same order, and no stretch between two of them may hold more matmuls than
    planned (a matmul moved across a collective or wait lands in another stretch; Inductor may dissolve a
    tiny one into fused pointwise code, so fewer is allowed)."""
    emitted = emitted_order(code)
    if [op for op, _ in emitted] != [op for op, _ in planned]:
        ops = [[op for op, _ in seq[1:]] for seq in (planned, emitted)]
        raise OrderLost(f"the scheduled graph issues {ops[0]}, Inductor's code {ops[1]}")
    for i, ((op, want), (_, got)) in enumerate(zip(planned, emitted)):
        if got > want:
            where = "before the first communication op" if i == 0 else f"after communication op {i} ({op})"
            raise OrderLost(f"{got} matmul(s) run {where} in Inductor's code, {want} in the scheduled graph: "
                            "compute moved across a collective or wait")


def data_dependent_sizes(gm: fx.GraphModule, state: TraceState) -> list[str]:
    """The unbacked symbols (sizes known only at run time) in ``gm``'s values and inputs, sorted by name."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    found: set = set()
    for value in [*state.fake_inputs, *(n.meta.get("val") for n in gm.graph.nodes)]:
        try:
            found |= free_unbacked_symbols(value)
        except Exception:  # noqa: BLE001 - a value it cannot walk holds no size of ours
            continue
    return sorted(str(s) for s in found)


def _without_donation(tracing: Any) -> Any:
    """``tracing`` with no backward input marked donated. aot_autograd lets Inductor reuse the memory of saved
    activations it found unaliased in the graph it traced; the planned forward may return them otherwise
    (a chunked activation and a view of it), and a backward writing into one would change the other."""
    meta = getattr(tracing, "fw_metadata", None)
    if meta is None or not getattr(meta, "bw_donated_idxs", None):
        return tracing
    out = copy.copy(tracing)
    out.fw_metadata = copy.copy(meta)
    out.fw_metadata.bw_donated_idxs = None
    return out


def decompose(gm: fx.GraphModule, state: TraceState) -> fx.GraphModule:
    """``gm`` traced again with Inductor's decomposition table, in the same order."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = state.fake_mode
    if fake_mode is None:
        raise ValueError(f"the {state.kind} graph's inputs carry no fake mode to trace it again in")
    with torch._guards.tracing(state.tracing), fake_mode:
        out = make_fx(fx.Interpreter(gm).run, decomposition_table=select_decomp_table())(*state.fake_inputs)
    return out


def compile_graph(gm: fx.GraphModule, state: TraceState, pin: bool = True) -> InductorGraph:
    """Compile ``gm`` with Inductor, its communication order pinned (``pin``) and checked in the code Inductor
    wrote (:class:`OrderLost` if it moved); :class:`SpecializedShapes` if Inductor had to guard on a dynamic size;
    raises what Inductor raises."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner

    unbacked = data_dependent_sizes(gm, state)
    if unbacked:
        raise DataDependentSizes(f"sizes known only at run time ({', '.join(unbacked[:4])}): Inductor's code would "
                                 "check assumptions about them that the traced graph does not")
    t0 = time.perf_counter()
    shape_env = getattr(state.fake_mode, "shape_env", None)
    guards = len(shape_env.guards) if shape_env is not None else 0
    graph = decompose(gm, state)
    planned = planned_order(graph.graph)
    ctx = PassContext(graph_kind=state.kind)
    if pin:
        graph = pin_order(graph, ctx)
    pins = sum(1 for n in graph.graph.nodes if getattr(n.target, "__name__", "") == "control_deps")
    with torch._guards.tracing(_without_donation(state.tracing)), inductor_config.patch(_NO_REORDER):
        compiled = compile_fx_inner(graph, state.fake_inputs, is_backward=state.kind == "backward",
                                    is_inference=False)
    if shape_env is not None and len(shape_env.guards) > guards:
        added = shape_env.guards[guards:]
        raise SpecializedShapes(f"Inductor guarded on {len(added)} dynamic size(s) "
                                f"({'; '.join(str(g.expr) for g in added[:3])}); Dynamo's guards for this graph "
                                "were fixed when it was traced, so nothing would check them")
    code = getattr(compiled, "source_code", "")
    code = code if isinstance(code, str) else ""
    if pin:
        check_order(planned, code)
    return InductorGraph(compiled, time.perf_counter() - t0, pins, code)
