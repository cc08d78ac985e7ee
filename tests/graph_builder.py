"""Hand-built FX graphs for the task-graph, annotate and verify tests, and injected cost tables.

Graphs are built with ``_c10d_functional`` ops (building them needs no process
group; they are never run) and ``meta["fsmoe"]`` as recognize/chunk write it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


class GraphBuilder:
    """Small fx.Graph builder: named nodes, ``meta["val"]`` (meta tensors) and ``meta["fsmoe"]``."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.fsmoe: dict | None = None  # meta["fsmoe"] given to nodes created while set

    def _node(self, target, args, name: str, val, kwargs=None, fsmoe: dict | None = None) -> fx.Node:
        n = self.graph.create_node("call_function", target, tuple(args), kwargs or {}, name=name)
        assert n.name == name, (n.name, name)
        n.meta["val"] = val
        meta = fsmoe if fsmoe is not None else self.fsmoe
        if meta is not None:
            n.meta["fsmoe"] = dict(meta)
        return n

    def input(self, name: str, *shape: int) -> fx.Node:
        n = self.graph.placeholder(name)
        n.meta["val"] = torch.empty(shape, device="meta")
        return n

    def op(self, name: str, target, *args, fsmoe: dict | None = None, **kwargs) -> fx.Node:
        vals = fx.node.map_arg(args, lambda a: a.meta["val"])
        return self._node(target, args, name, target(*vals, **kwargs), kwargs, fsmoe)

    def a2a(self, name: str, x: fx.Node, group: str = "ep", fsmoe: dict | None = None) -> fx.Node:
        """``all_to_all_single`` + ``wait_tensor`` (named ``name`` and ``wait_<name>``); returns the wait."""
        v = x.meta["val"]
        start = self._node(c10d.all_to_all_single.default, (x, [2, 2], [2, 2], group), name, torch.empty_like(v),
                           fsmoe=fsmoe)
        return self._node(c10d.wait_tensor.default, (start,), f"wait_{name}", torch.empty_like(v), fsmoe=fsmoe)

    def all_reduce(self, name: str, x: fx.Node, group: str = "dp", fsmoe: dict | None = None) -> fx.Node:
        v = x.meta["val"]
        start = self._node(c10d.all_reduce.default, (x, "sum", group), name, torch.empty_like(v), fsmoe=fsmoe)
        return self._node(c10d.wait_tensor.default, (start,), f"wait_{name}", torch.empty_like(v), fsmoe=fsmoe)

    def all_gather(self, name: str, x: fx.Node, group: str = "esp", fsmoe: dict | None = None) -> fx.Node:
        v = x.meta["val"]
        out = torch.empty((2 * v.shape[0], *v.shape[1:]), device="meta")
        start = self._node(c10d.all_gather_into_tensor.default, (x, 2, group), name, out, fsmoe=fsmoe)
        return self._node(c10d.wait_tensor.default, (start,), f"wait_{name}", torch.empty_like(out), fsmoe=fsmoe)

    def output(self, *nodes: fx.Node) -> fx.GraphModule:
        self.graph.output(tuple(nodes))
        self.graph.lint()
        return fx.GraphModule(torch.nn.Module(), self.graph)


def cost_table(table: dict[str, float], default: float = 0.0):
    """An injected cost model: node name -> ms (``default`` for nodes not listed)."""
    return lambda node: float(table.get(node.name, default))


def region(layer: int, role: str, chunk: int | None = None, degree: int = 1) -> dict:
    m = {"layer": layer, "role": role, "degree": degree}
    if chunk is not None or degree > 1:
        m["chunk"] = chunk
    return m


def forward_ep_chunked(r: int = 2) -> fx.GraphModule:
    """One EP MoE layer chunked r ways: router, then per chunk dispatch a2a -> expert -> combine a2a; a glue cat."""
    b = GraphBuilder()
    x = b.input("x", 4 * r, 8)
    wg = b.input("w_gate", 8, 4)
    we = b.input("w_expert", 8, 8)
    b.fsmoe = region(0, "router", degree=r)
    scores = b.op("scores", aten.mm.default, x, wg)
    probs = b.op("probs", aten._softmax.default, scores, -1, False)
    outs = []
    for c in range(r):
        b.fsmoe = region(0, "dispatch", c, r)
        xc = b.op(f"x_c{c}", aten.slice.Tensor, x, 0, 4 * c, 4 * c + 4)
        disp = b.op(f"disp_c{c}", aten.mul.Tensor, xc, 2.0)
        recv = b.a2a(f"a2a_d{c}", disp)
        b.fsmoe = region(0, "expert", c, r)
        h = b.op(f"exp_c{c}", aten.mm.default, recv, we)
        act = b.op(f"act_c{c}", aten.relu.default, h)
        back = b.a2a(f"a2a_c{c}", act, fsmoe=region(0, "combine", c, r))
        b.fsmoe = region(0, "combine", c, r)
        outs.append(b.op(f"comb_c{c}", aten.mul.Tensor, back, 0.5))
    b.fsmoe = region(0, "combine", None, r)
    y = b.op("cat", aten.cat.default, outs)
    b.fsmoe = None
    loss_in = b.op("dense_out", aten.add.Tensor, y, x)
    return b.output(loss_in, probs)


FWD_COSTS = {"scores": 1.0, "probs": 0.5, "disp_c0": 0.5, "disp_c1": 0.5, "a2a_d0": 2.0, "a2a_d1": 2.0,
             "exp_c0": 3.0, "exp_c1": 3.0, "act_c0": 0.5, "act_c1": 0.5, "a2a_c0": 2.0, "a2a_c1": 2.0,
             "comb_c0": 0.25, "comb_c1": 0.25, "cat": 0.25, "dense_out": 1.0}


def backward_ep() -> fx.GraphModule:
    """An expert backward: grad -> a2a -> dX = g @ W^T -> a2a -> out, and dW = X^T @ g (feeds no collective)."""
    b = GraphBuilder()
    g = b.input("grad_out", 8, 8)
    xs = b.input("saved_x", 8, 8)
    w = b.input("w_expert", 8, 8)
    b.fsmoe = region(0, "combine")
    gperm = b.op("g_perm", aten.mul.Tensor, g, 1.0)
    recv = b.a2a("a2a_g", gperm, fsmoe=region(0, "combine"))
    b.fsmoe = region(0, "expert")
    wt = b.op("w_t", aten.t.default, w)
    dx = b.op("dx_mm", aten.mm.default, recv, wt)
    xt = b.op("x_t", aten.t.default, xs)
    dw = b.op("dw_mm", aten.mm.default, xt, recv)
    back = b.a2a("a2a_dx", dx, fsmoe=region(0, "dispatch"))
    b.fsmoe = region(0, "dispatch")
    dxin = b.op("dx_in", aten.mul.Tensor, back, 1.0)
    return b.output(dxin, dw)


BWD_COSTS = {"g_perm": 0.5, "a2a_g": 2.0, "dx_mm": 3.0, "dw_mm": 3.0, "a2a_dx": 2.0, "dx_in": 0.5}
