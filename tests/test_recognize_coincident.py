"""MoE recognition when sizes coincide: the same model must be labelled the same whatever its sizes.

A recogniser that decides "this tensor is in token order" by looking for a
dimension equal to the token count ``T`` mislabels nodes when another size
equals ``T``: the hidden width (``T == M``), the expert buffer (``E*C == T``),
the expert count (``E == T``, where expert choice would pass for token choice)
or ``top_k*T == E*C``. Each case here compiles one model twice, once with
sizes that coincide and once with distinct sizes; aot_autograd then yields the
same graphs node for node (same names, same ops), so recognition must report
the same region facts (up to the sizes themselves) and give every node the
same role. Key nodes are also checked against their expected role directly:
expert-weight matmuls (forward, input and weight gradients) are "expert", the
topk and gate matmuls are "router", and the scatter / index_add / gather nodes
that move token data are "dispatch" or "combine". Key nodes are picked on the
non-coincident graph, where sizes are unambiguous.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fsmoe_compiler.moe import MoELayer
from fsmoe_compiler.ops import GATHER_OPS, LAYOUT_OPS, MATMUL_OPS, SCATTER_OPS, TOPK_OPS
from fsmoe_compiler.passes.recognize import find_moe_regions
from graph_capture import captured, fake_world
import moe_styles as ms

M, FFN, BATCH = 16, 32, 2


class LayerBlock(nn.Module):
    """LayerNorm -> our MoELayer with a residual; the aux loss joins the output."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(M)
        self.moe = MoELayer(M, FFN, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, aux = self.moe(self.ln(x))
        return x + y + 0.01 * aux


def _style(name: str, **kw):
    return lambda tokens: ms.STYLES[name](**kw)


def _capacity_style(cf: float):
    return lambda tokens: ms.CapacityMoE(hidden=M, ffn=FFN, tokens=tokens, capacity_factor=cf)


def _layer(**kw):
    return lambda tokens: LayerBlock(**kw)


def _cap(k, t, cf, e):
    return math.ceil(k * t * cf / e)


def _ec_cap(t, e, cf=1.25, k=2):
    return min(_cap(k, t, cf, e), t)


# name -> (builder(tokens), (ref seq, ref facts), (coincident seq, coincident facts)); facts are
# (router, experts, top_k, capacity, tokens); hidden is M and ffn is FFN throughout. BATCH is 2.
CASES = {
    # T == M (16); top_k*T == E*C == FFN (32) for the capacity style with cf 1.0
    "loop-T=M": (_style("loop"), (12, ("softmax-topk", 4, 2, None, 24)), (8, ("softmax-topk", 4, 2, None, 16))),
    "sort-T=M": (_style("sort"), (12, ("softmax-topk", 4, 2, None, 24)), (8, ("softmax-topk", 4, 2, None, 16))),
    "sort-grouped-T=M": (_style("sort-grouped"), (12, ("softmax-topk", 4, 2, None, 24)),
                         (8, ("softmax-topk", 4, 2, None, 16))),
    "capacity-T=M-kT=EC": (None, (12, ("softmax-topk", 4, 2, _cap(2, 24, 1.25, 4), 24)),
                           (8, ("softmax-topk", 4, 2, _cap(2, 16, 1.0, 4), 16))),
    # E*C == T (24): cf 0.5 -> C = 6
    "capacity-EC=T": (None, (12, ("softmax-topk", 4, 2, _cap(2, 24, 0.75, 4), 24)),
                      (12, ("softmax-topk", 4, 2, _cap(2, 24, 0.5, 4), 24))),
    "gshard-capacity-T=M-kT=EC": (None, (12, ("softmax-topk", 4, 2, _cap(2, 24, 1.25, 4), 24)),
                                  (8, ("softmax-topk", 4, 2, _cap(2, 16, 1.0, 4), 16))),
    "gshard-capacity-EC=T": (None, (12, ("softmax-topk", 4, 2, _cap(2, 24, 0.75, 4), 24)),
                             (12, ("softmax-topk", 4, 2, _cap(2, 24, 0.5, 4), 24))),
    "gshard-dropless-T=M": (_layer(num_experts=4, router="gshard", dispatch="dropless"),
                            (12, ("softmax-topk", 4, 2, None, 24)), (8, ("softmax-topk", 4, 2, None, 16))),
    "mixtral-dropless-T=M": (_layer(num_experts=4, router="mixtral", dispatch="dropless", expert="swiglu"),
                             (12, ("softmax-topk", 4, 2, None, 24)), (8, ("softmax-topk", 4, 2, None, 16))),
    "expert-choice-T=M": (_layer(num_experts=4, router="expert_choice"),
                          (12, ("expert-choice", 4, None, _ec_cap(24, 4), 24)),
                          (8, ("expert-choice", 4, None, _ec_cap(16, 4), 16))),
    # E == T (8): expert choice must not pass for token choice
    "expert-choice-E=T": (_layer(num_experts=8, router="expert_choice"),
                          (6, ("expert-choice", 8, None, _ec_cap(12, 8), 12)),
                          (4, ("expert-choice", 8, None, _ec_cap(8, 8), 8))),
    "softmoe-T=M": (_layer(num_experts=4, router="softmoe"), (12, ("soft", 4, None, 1, 24)),
                    (8, ("soft", 4, None, 1, 16))),
    # E * slots == T == M (16)
    "softmoe-ES=T=M": (None, (12, ("soft", 4, None, 3, 24)), (8, ("soft", 4, None, 4, 16))),
}
# models whose capacity factor, not the batch, makes the sizes coincide
CF = {
    "capacity-T=M-kT=EC": (1.25, 1.0), "capacity-EC=T": (0.75, 0.5),
    "gshard-capacity-T=M-kT=EC": (1.25, 1.0), "gshard-capacity-EC=T": (0.75, 0.5),
}


def _builder(case: str, which: int):
    build = CASES[case][0]
    if case.startswith("capacity-"):
        return _capacity_style(CF[case][which])
    if case == "softmoe-ES=T=M":  # 3 slots per expert for the reference, 4 (E*S == 16) where sizes coincide
        return _layer(num_experts=4, router="softmoe", router_kwargs=dict(slots_per_expert=3 + which))
    if case.startswith("gshard-capacity"):
        return _layer(num_experts=4, router="gshard", dispatch="capacity", capacity_factor=CF[case][which])
    return build


def _model(case: str, which: int) -> nn.Module:
    return _builder(case, which)(BATCH * CASES[case][1 + which][0])


@functools.lru_cache(maxsize=None)
def _graphs(case: str, which: int):
    """(forward, backward, forward regions, backward regions) of the reference (0) or coincident (1) model."""
    seq = CASES[case][1 + which][0]
    graphs = captured(_model, case, which, inputs=((BATCH, seq, M),))
    fw, bw = graphs.forward[0], graphs.backward[0]
    return fw, bw, find_moe_regions(fw, "forward"), find_moe_regions(bw, "backward")


@functools.lru_cache(maxsize=None)
def _backward_given_forward(case: str, which: int):
    """Backward regions found with the forward regions at hand, as the recognition pass finds them."""
    fw, bw, f, _ = _graphs(case, which)
    return find_moe_regions(bw, "backward", f)


def _facts(r):
    return (r.layer, r.router, r.num_experts, r.top_k, r.capacity, r.dropless, r.tokens, r.hidden, r.ffn_hidden)


def _roles(regions) -> dict[str, str]:
    return {name: role for r in regions for role, names in r.nodes.items() for name in names}


def _root(node: fx.Node) -> fx.Node | None:
    """The placeholder ``node`` is a view, slice or cast of, or None."""
    cur = node
    for _ in range(12):
        if cur.op == "placeholder":
            return cur
        ins = [a for a in cur.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if cur.op != "call_function" or cur.target not in LAYOUT_OPS or len(ins) != 1:
            return None
        cur = ins[0]
    return None


def _shape(node) -> tuple | None:
    """The shape with each symbolic (data-dependent) size as None."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else None for d in v.shape)


def _operands(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _shape(a) is not None]


def _key_roles(fw: fx.GraphModule, bw: fx.GraphModule, tokens: int) -> tuple[dict[str, str], dict[str, str]]:
    """Expected roles of key nodes of the reference graphs, picked by their (there unambiguous) sizes.

    Expert weights are the forward graph's parameter inputs with the expert
    width FFN in their shape; the gate's are the other parameters of two or
    more dimensions with the expert dimension (an [E, M] gate, [M, E, S] slot
    embeddings).
    """
    placeholders = [n for n in fw.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    weights = {p.name for p in placeholders if len(_shape(p)) >= 2 and FFN in _shape(p)}
    weight_shapes = set()
    for p in placeholders:
        if p.name in weights:
            s = _shape(p)
            for v in (s, s[1:]):
                if len(v) >= 2:
                    weight_shapes |= {v, v[:-2] + (v[-1], v[-2])}
    gate = {p.name for p in placeholders if p.name not in weights and len(_shape(p)) >= 2 and _shape(p)[0] != BATCH}
    # views and casts of the weights in the forward graph: the backward graph may be given those instead
    for n in fw.graph.nodes:
        root = _root(n) if n.op == "call_function" else None
        if root is not None:
            for names in (weights, gate):
                if root.name in names:
                    names.add(n.name)

    def roots(n):
        return {r.name for r in (_root(a) for a in _operands(n)) if r is not None}

    fwd: dict[str, str] = {}
    for n in fw.graph.nodes:
        if n.op != "call_function":
            continue
        s = _shape(n)
        if n.target in MATMUL_OPS and roots(n) & weights:
            fwd[n.name] = "expert"
        elif n.target in MATMUL_OPS and roots(n) & gate:
            fwd[n.name] = "router"
        elif n.target in TOPK_OPS:
            fwd[n.name] = "router"
        elif s and len(s) >= 2 and s[-1] == M and n.meta["val"].dtype.is_floating_point:
            if n.target in SCATTER_OPS:  # token data moved into expert buffers, or back to token order
                fwd[n.name] = "combine" if s[-2] == tokens else "dispatch"
            elif n.target in GATHER_OPS and _shape(n.args[0])[-2:] == (tokens, M):
                fwd[n.name] = "dispatch"  # token rows gathered for the experts
    # backward: placeholders keep their forward names
    grad = set()
    for n in bw.graph.nodes:
        if n.op == "placeholder" and n.name.startswith("tangents"):
            grad.add(n.name)
        elif n.op == "call_function" and any(a.name in grad for a in n.all_input_nodes):
            grad.add(n.name)
    bwd: dict[str, str] = {}
    for n in bw.graph.nodes:
        if n.op != "call_function" or n.name not in grad:
            continue
        s = _shape(n)
        if n.target in MATMUL_OPS:
            if roots(n) & weights or s in weight_shapes:
                bwd[n.name] = "expert"  # input gradient through an expert weight, or an expert weight's gradient
            elif roots(n) & gate:
                bwd[n.name] = "router"  # the gate's input gradient
            elif s and s[-2:] == (tokens, M) and not any(r in weights | gate for r in roots(n)):
                bwd[n.name] = "dispatch"  # dispatch mask (or weights) times the expert-side gradient
        elif n.target in SCATTER_OPS and s and s[-1] == M and s[-2] == tokens:
            bwd[n.name] = "dispatch"  # gradient rows scattered back to token order
        elif n.target in GATHER_OPS and s and s[-1] == M and _shape(n.args[0])[-2:] == (tokens, M):
            bwd[n.name] = "combine"  # the output gradient gathered into expert order
        elif "scatter" in str(n.target) and s and tokens in s and s[-1] != M and len(s) == 2:
            bwd[n.name] = "router"  # the topk gradient: a scatter into [tokens, experts] (or [experts, tokens])
        elif "softmax_backward" in str(n.target) and s and tokens in s and len(s) == 2:
            bwd[n.name] = "router"
    return fwd, bwd


@pytest.mark.parametrize("case", list(CASES))
def test_coincident_sizes_same_regions(case):
    """Region facts of the coincident model are those of the reference, up to the sizes themselves."""
    for which in (0, 1):
        fw, bw, f, b = _graphs(case, which)
        router, experts, top_k, capacity, tokens = CASES[case][1 + which][1]
        want = [(0, router, experts, top_k, capacity, capacity is None, tokens, M, FFN)]
        label = "reference" if which == 0 else "coincident"
        assert [_facts(r) for r in f] == want, f"{label} forward"
        assert [_facts(r) for r in b] == want, f"{label} backward"
        given = _backward_given_forward(case, which)
        assert [_facts(r) for r in given] == want, f"{label} backward, given the forward regions"
        assert _roles(given) == _roles(b), f"{label} backward, given the forward regions"


@pytest.mark.parametrize("case", list(CASES))
def test_coincident_sizes_same_roles(case):
    """Node for node, the coincident graphs are labelled as the reference graphs are."""
    fw0, bw0, f0, b0 = _graphs(case, 0)
    fw1, bw1, f1, b1 = _graphs(case, 1)
    for kind, g0, g1, r0, r1 in (("forward", fw0, fw1, f0, f1), ("backward", bw0, bw1, b0, b1)):
        ops0 = [(n.name, str(n.target)) for n in g0.graph.nodes]
        ops1 = [(n.name, str(n.target)) for n in g1.graph.nodes]
        assert ops0 == ops1, f"{kind}: the two sizes give different graphs; the case does not test coincidences"
        roles0, roles1 = _roles(r0), _roles(r1)
        diff = {n: (roles0.get(n), roles1.get(n)) for n in set(roles0) | set(roles1) if roles0.get(n) != roles1.get(n)}
        assert not diff, f"{kind}: role (reference, coincident) differs for {dict(sorted(diff.items()))}"


@pytest.mark.parametrize("case", list(CASES))
def test_coincident_sizes_key_node_roles(case):
    """Expert-weight matmuls are "expert", topk and gate are "router", token moves are dispatch / combine."""
    fw0, bw0, _, _ = _graphs(case, 0)
    fwd, bwd = _key_roles(fw0, bw0, CASES[case][1][1][4])
    assert any(r == "expert" for r in fwd.values()) and any(r == "expert" for r in bwd.values())
    assert any(r == "router" for r in fwd.values()) and any(r == "router" for r in bwd.values())
    for which in (0, 1):
        _, _, f, b = _graphs(case, which)
        label = "reference" if which == 0 else "coincident"
        for kind, want, regions in (("forward", fwd, f), ("backward", bwd, b)):
            got = _roles(regions)
            wrong = {n: (role, got.get(n)) for n, role in want.items() if got.get(n) != role}
            assert not wrong, f"{label} {kind}: (expected, found) role of key nodes {dict(sorted(wrong.items()))}"


# ---------------------------------------------------------------- expert parallelism, 2 ranks (fake process group)

# name -> (MoELayer keywords, (reference seq, capacity factor), (coincident seq, capacity factor)); tokens are per rank
EP_CASES = {
    "gshard-capacity-T=M-kT=EC": (dict(num_experts=4, router="gshard", dispatch="capacity"), (12, 1.25), (8, 1.0)),
    "gshard-dropless-T=M": (dict(num_experts=4, router="gshard", dispatch="dropless"), (12, 1.25), (8, 1.25)),
    "expert-choice-E=T": (dict(num_experts=8, router="expert_choice"), (6, 1.25), (4, 1.25)),
}


def _ep_rank() -> dict:
    """Recognise each EP case at both sizes on this rank; return facts, all-to-all roles and all node roles."""
    out = {}
    for name, (kw, *sizes) in EP_CASES.items():
        for which, (seq, cf) in enumerate(sizes):
            graphs = captured(LayerBlock, capacity_factor=cf, **kw, inputs=((BATCH, seq, M),))
            fw, bw = graphs.forward[0], graphs.backward[0]
            f = find_moe_regions(fw, "forward")
            for kind, gm, regions in (("forward", fw, f), ("backward", bw, find_moe_regions(bw, "backward", f))):
                out[(name, which, kind)] = dict(
                    facts=[_facts(r)[:5] for r in regions],
                    a2a=[(a, r.role_of(a)) for r in regions for a in r.all_to_all],
                    a2a_in_graph=sorted(n.name for n in gm.graph.nodes if "all_to_all_single" in str(n.target)),
                    ops=[(n.name, str(n.target)) for n in gm.graph.nodes],
                    roles=_roles(regions),
                )
    return out


@pytest.fixture(scope="module")
def ep_results():
    """Rank 0 of 2 over PyTorch's fake process group: the real EP graphs (shapes, all-to-alls), nothing is run
    that these tests read (they check roles and graph structure, not numbers)."""
    with fake_world(rank=0, world_size=2):
        return _ep_rank()


@pytest.mark.parametrize("case", list(EP_CASES))
def test_coincident_sizes_expert_parallel(ep_results, case):
    """With expert parallelism the all-to-alls keep their roles and every node its role when sizes coincide."""
    a2a_roles = {"forward": ["dispatch", "combine"], "backward": ["combine", "dispatch"]}
    if "dropless" in case:  # the token counts go first, as routing metadata; they have no gradient
        a2a_roles["forward"] = ["router", "dispatch", "combine"]
    experts = EP_CASES[case][0]["num_experts"]
    router = "expert-choice" if "expert-choice" in case else "softmax-topk"
    for kind in ("forward", "backward"):
        ref, co = ep_results[(case, 0, kind)], ep_results[(case, 1, kind)]
        assert ref["ops"] == co["ops"], f"{kind}: the two sizes give different graphs"
        for label, res in (("reference", ref), ("coincident", co)):
            assert [fact[:3] for fact in res["facts"]] == [(0, router, experts)], f"{label} {kind}"
            assert [a for a, _ in res["a2a"]] == res["a2a_in_graph"], f"{label} {kind}"
            assert [role for _, role in res["a2a"]] == a2a_roles[kind], f"{label} {kind}"
        diff = {n: (ref["roles"].get(n), co["roles"].get(n)) for n in set(ref["roles"]) | set(co["roles"])
                if ref["roles"].get(n) != co["roles"].get(n)}
        assert not diff, f"{kind}: role (reference, coincident) differs for {dict(sorted(diff.items()))}"
