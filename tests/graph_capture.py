"""Capture the forward and backward ATen graphs that aot_autograd produces for a module.

The capture compiler stores each graph module it is given and returns its
``forward`` unchanged (boxed, as aot_autograd calls it), so the model still
runs eagerly-equivalent code.

:func:`captured` is the session-wide cache over :func:`capture_graphs`: many
tests read the graphs of the same model, and compiling costs seconds. Graphs
it returns are shared with every other test: read them, or ask for
``copy=True`` to get graphs of your own to change (passes that tag
``node.meta`` count as changes). A shared graph that changed anyway is an
error at its next use from the cache, naming it.

:func:`fake_world` runs a block as one rank of a process group over PyTorch's
fake backend, which gives a rank's real shapes and collectives in its graphs
without running any communication: for tests of graph structure, not numbers.
"""

from __future__ import annotations

import contextlib
import copy as copy_mod
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.distributed as dist
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func


@dataclass
class CapturedGraphs:
    """Graph modules seen by the forward and backward compilers, in call order (and the model they came from)."""

    forward: list[torch.fx.GraphModule] = field(default_factory=list)
    backward: list[torch.fx.GraphModule] = field(default_factory=list)
    model: torch.nn.Module | None = None


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
    graphs.model = model
    return graphs


# ------------------------------------------------------------------------------------------------ session cache

_CACHE: dict[tuple, tuple[CapturedGraphs, str]] = {}
STATS = {"captures": 0, "hits": 0}


def _world() -> tuple | None:
    """The process group the graphs were traced in (an EP layer's graphs depend on it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_backend(), dist.get_rank(), dist.get_world_size()


def _fingerprint(graphs: CapturedGraphs) -> str:
    """The code of every graph and every node's metadata keys and fsmoe tags: what a test could change."""
    h = hashlib.sha256()
    for gm in graphs.forward + graphs.backward:
        h.update(gm.code.encode())
        for n in gm.graph.nodes:
            h.update(f"{n.name}|{sorted(n.meta)}|{n.meta.get('fsmoe')!r}\n".encode())
    return h.hexdigest()


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for a factory argument (dicts and lists become sorted tuples)."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    return value


def _make_inputs(inputs: Callable[[], Any] | tuple) -> tuple:
    if callable(inputs):
        made = inputs()
        return made if isinstance(made, tuple) else (made,)
    return tuple(torch.randn(shape) for shape in inputs)


def captured(
    factory: Callable[..., torch.nn.Module],
    *args: Any,
    inputs: Callable[[], Any] | tuple[tuple[int, ...], ...],
    seed: int | None = 0,
    copy: bool = False,
    backward: bool = True,
    dynamic: bool | None = False,
    fullgraph: bool = True,
    **kwargs: Any,
) -> CapturedGraphs:
    """The graphs of ``factory(*args, **kwargs)`` run on ``inputs``, captured once per session.

    The capture is: ``torch.manual_seed(seed)`` (unless ``seed`` is None), the
    model from the factory, then the inputs: ``inputs()`` (a callable, hashed by
    identity: define it at module level) or ``torch.randn`` of each shape in a
    tuple of shapes. The key is the factory, its arguments, the inputs, the
    seed, the capture options and the process group in use (rank and size).
    The graphs returned are shared with other tests unless ``copy`` is true.
    """
    key = (factory, _freeze(args), _freeze(kwargs), inputs, seed, backward, dynamic, fullgraph, _world())
    hit = _CACHE.get(key)
    if hit is None:
        if seed is not None:
            torch.manual_seed(seed)
        model = factory(*args, **kwargs)
        graphs = capture_graphs(model, *_make_inputs(inputs), backward=backward, dynamic=dynamic,
                                fullgraph=fullgraph)
        _CACHE[key] = hit = (graphs, _fingerprint(graphs))
        STATS["captures"] += 1
    else:
        STATS["hits"] += 1
        if _fingerprint(hit[0]) != hit[1]:
            raise AssertionError(
                f"a test changed the cached graphs of {getattr(factory, '__qualname__', factory)}{args}: "
                "ask graph_capture.captured(..., copy=True) for graphs you change")
    graphs = hit[0]
    if copy:
        return replace(graphs, forward=[copy_mod.deepcopy(g) for g in graphs.forward],
                       backward=[copy_mod.deepcopy(g) for g in graphs.backward])
    return graphs


def clear_cache() -> None:
    _CACHE.clear()


# ------------------------------------------------------------------------------------------------ fake process group


@contextlib.contextmanager
def fake_world(rank: int = 0, world_size: int = 2) -> Iterator[None]:
    """A default process group of ``world_size`` ranks seen from ``rank``, over PyTorch's fake backend.

    Collectives are not run (each returns its input, hallucinated), so only
    graph structure and shapes mean anything inside the block.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def grads_through(make_compiled_fn: Callable[[torch.fx.GraphModule], Callable], steps: int = 1) -> bool:
    """Train a small MLP ``steps`` times through aot_autograd with ``make_compiled_fn(gm)`` as both compilers.

    Returns whether the last step's gradients equal eager's (wrappers such as
    the executor and the profilers must be drop-in compiled functions).
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    torch._dynamo.reset()
    compiler = lambda gm, example_inputs: make_compiled_fn(gm)  # noqa: E731
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=compiler, bw_compiler=compiler), fullgraph=True)
    for _ in range(steps):
        model.zero_grad()
        compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    return all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(got, model.parameters()))


def run_with_identity_all_to_all(gm: torch.fx.GraphModule, *args: torch.Tensor) -> Any:
    """Run a copy of ``gm`` with each all-to-all replaced by a copy of its input (what one rank gets back on a
    world of one), so a rewritten graph's numbers can be compared with the original's in one process."""
    gm = copy_mod.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.target is torch.ops._c10d_functional.all_to_all_single.default:
            node.target, node.args = torch.ops.aten.clone.default, (node.args[0],)
    gm.recompile()
    return gm(*args)
