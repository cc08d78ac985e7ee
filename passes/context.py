"""The pass contract: the typed state every graph pass receives beside the graph, and what each pass reads and writes.

A pass is a function ``(gm, ctx) -> gm``. It declares with :func:`graph_pass`
which :class:`PassContext` fields it needs (``reads``), which it uses when
present (``uses``) and which it fills (``writes``). Calling a pass whose
``reads`` no earlier pass wrote raises :class:`MissingContext` naming the
field and the pass that writes it, and :func:`check_pipeline` checks a whole
pipeline the same way before it runs, so a pipeline that reads top to bottom
is also one that is checked top to bottom.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

import torch.fx as fx

from fsmoe_compiler.config import FSMoEConfig

if TYPE_CHECKING:  # annotation-only imports: these modules import this one
    from fsmoe_compiler.passes.chunk import ChunkInfo
    from fsmoe_compiler.passes.region import MoERegion
    from fsmoe_compiler.passes.split_tokens import TokenSplit
    from fsmoe_compiler.passes.taskgraph import TaskMap
    from fsmoe_compiler.passes.verify import GraphSignature
    from fsmoe_compiler.scheduler import Schedule, TaskGraph

#: The two graphs aot_autograd hands a backend, and Dynamo's graph before it (the token-split pass runs there).
GRAPH_KINDS = ("forward", "backward", "dynamo")


class NodeCosts(Protocol):
    """What the task-graph pass needs of a cost model: milliseconds for one node (``profiler.CostModel``)."""

    def node_cost(self, node: fx.Node) -> float: ...


@dataclass
class PassContext:
    """What one run of the pass pipeline over one graph shares between passes.

    ``graph_kind`` is "forward" or "backward" (ATen graphs), or "dynamo" (the graph before autograd); ``config`` the backend's options
    (the defaults when a test builds a context by hand); ``strict`` turns "leave
    it alone and say why" into an error (the config's ``strict``, or less: a
    planner trying degrees under ``"auto"`` never raises); ``original`` the
    signature of the graph before any pass ran; ``regions`` the MoE regions per
    graph kind; ``notes`` remarks for the report.

    Scheduling state, filled as the pipeline goes: ``degrees`` the chunks asked
    per layer (a layer not named gets 1); ``chunking`` what the chunk pass did
    per layer (``ChunkInfo.degree`` is the degree applied); ``costs`` the
    measured cost model; ``taskgraph``/``taskmap`` the scheduler's task graph of
    this graph and its map back to nodes; ``schedule`` the solved schedule.
    ``token_splits``: the layers the Dynamo graph's token-split pass runs on token ranges.
    """

    graph_kind: str = "forward"
    config: FSMoEConfig = field(default_factory=FSMoEConfig)
    strict: bool = False
    original: GraphSignature | None = None
    regions: dict[str, list[MoERegion]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    degrees: dict[int, int] = field(default_factory=dict)
    chunking: dict[int, ChunkInfo] = field(default_factory=dict)
    costs: NodeCosts | None = None
    taskgraph: TaskGraph | None = None
    taskmap: TaskMap | None = None
    schedule: Schedule | None = None
    token_splits: list[TokenSplit] | None = None

    def __post_init__(self) -> None:
        if self.graph_kind not in GRAPH_KINDS:
            raise ValueError(f"graph_kind must be one of {', '.join(map(repr, GRAPH_KINDS))}, got {self.graph_kind!r}")

    def has(self, name: str) -> bool:
        """Whether field ``name`` holds what a pass wrote: not None, and for ``regions`` this graph's list."""
        if name == "regions":
            return self.graph_kind in self.regions
        return getattr(self, name) is not None

    @property
    def regions_here(self) -> list[MoERegion]:
        """The regions of this graph (``regions[graph_kind]``; empty before recognition)."""
        return self.regions.get(self.graph_kind, [])


_FIELDS = frozenset(f.name for f in fields(PassContext))
#: Fields a context has from the start (set by whoever builds it), so no pass needs to write them.
GIVEN = frozenset({"graph_kind", "config", "strict", "notes", "degrees", "chunking"})


class MissingContext(ValueError):
    """A pass reads a context field that no earlier pass wrote."""


@dataclass(frozen=True)
class PassSpec:
    """A pass's declared contract: fields it needs, fields it reads when present, fields it fills."""

    name: str
    reads: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


def graph_pass(*, reads: Sequence[str] = (), uses: Sequence[str] = (), writes: Sequence[str] = ()) -> Callable:
    """Declare a pass's contract; the wrapped pass raises ``MissingContext`` when a field in ``reads`` is unset."""
    for name in (*reads, *uses, *writes):
        if name not in _FIELDS:
            raise ValueError(f"unknown PassContext field {name!r}; fields: {', '.join(sorted(_FIELDS))}")

    def wrap(fn: Pass) -> Pass:
        spec = PassSpec(f"passes.{fn.__name__}", tuple(reads), tuple(uses), tuple(writes))

        @functools.wraps(fn)
        def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
            for name in spec.reads:
                if not ctx.has(name):
                    raise MissingContext(f"{spec.name} reads ctx.{name}, which is not set{_writers_hint(name)}")
            return fn(gm, ctx)

        run.spec = spec  # type: ignore[attr-defined]
        _WRITERS.setdefault(spec.name, spec)
        return run

    return wrap


_WRITERS: dict[str, PassSpec] = {}
#: The modules that define passes (imported when an error names the pass that writes a field).
PASS_MODULES = ("split_tokens", "narrow_comm", "recognize", "whole", "chunk", "taskgraph", "solve", "annotate", "verify")


def _writers_hint(name: str) -> str:
    import importlib

    for module in PASS_MODULES:
        importlib.import_module(f"fsmoe_compiler.passes.{module}")
    writers = sorted(s.name for s in _WRITERS.values() if name in s.writes)
    return f" (run {' or '.join(writers)} first)" if writers else ""


def spec_of(p: Pass) -> PassSpec:
    """The contract ``p`` declared with :func:`graph_pass`."""
    spec = getattr(p, "spec", None)
    if not isinstance(spec, PassSpec):
        raise TypeError(f"{getattr(p, '__name__', p)!r} is not a declared graph pass (use @graph_pass)")
    return spec


def check_pipeline(passes: Iterable[Pass], given: Iterable[str] = ()) -> None:
    """Raise ``MissingContext`` if some pass reads a field neither ``given`` nor written by an earlier pass."""
    have = set(GIVEN) | set(given)
    for p in passes:
        spec = spec_of(p)
        missing = [name for name in spec.reads if name not in have]
        if missing:
            raise MissingContext(f"{spec.name} reads ctx.{', ctx.'.join(missing)}, which no earlier pass of the "
                                 f"pipeline writes{_writers_hint(missing[0])}")
        have |= set(spec.writes)
