"""``torchtitan_graph``: torchtitan's own graph_trainer EP-overlap compiler passes, as a peer of the fsmoe methods.

The method runs what torchtitan's ``experiments/graph_trainer`` does with
``--compile.mode aot_fx_trace --compile.ep_overlap.enabled`` on the bench's
``--model torchtitan`` (``examples/titan_moe.py``), calling graph_trainer's
functions, not copies of them:

1. annotate the model as graph_trainer's model parallelizers do
   (``annotate_moe_ep_regions``, ``annotate_module_fqns``), the decoder blocks
   named ``layers`` so that its ``layers.*.moe`` pattern selects the MoE layers;
2. mark the batch dim of ``(idx, targets)`` as the chunk dim
   (``mark_chunk_dynamic_dims``) and trace one joint forward + loss + backward
   graph with its make_fx tracer (``minimal_fx_tracer``; the traced step
   returns the loss and every parameter's gradient, as graph_trainer's
   ``make_fwd_bwd_step`` does);
3. build its pass list (``compile_time_passes``, without Inductor and CUDA
   graphs: the graph runs as FX code, like ``aot_eager``) with EP overlap on:
   graph chunking into 2 token chunks along ``batch`` (``seq`` gives wrong
   norm-weight gradients with batch > 1), EP process-group isolation, the
   overlap schedule; and apply it with ``apply_graph_passes``, which leaves out
   the passes named in :data:`DISABLED_PASSES` through graph_trainer's own
   ``compile.disable_passes``;
4. each step, run the graph (``run_traced``) and return the loss; its
   ``backward()`` hands the graph's gradients to autograd, so every
   parameter's ``.grad`` is filled as eager's backward fills it and the
   bench's gradient sync and SGD step stay the same for every method.

Process-local changes it needs on this CPU-only torch 2.13 build, each applied
only while this method traces or rewrites its graph, and listed in the
method's info (:data:`CPU_CHANGES`):

* ``fakeify``: torch 2.13's ``make_fx`` fails to bind the unbacked symbols that
  fakeifying a marked input creates (proxy_tensor "Expected Proxy"): those
  symbols belong to the input, so they are dropped from the shape environment's
  pending fresh unbacked symbols right after graph_trainer's ``_fakeify_input``;
* ``suffix_insertion``: when the MoE input's gradient leaves the chunked
  region, ``ep_chunk_pass`` rebuilds the full-size reshape after the
  concatenation, before the ``sym_size`` nodes that reshape reads (lint
  fails); the reshape is created at the surrounding insertion point instead,
  after those nodes;
* ``trainer_import`` (only when needed): graph_trainer's config module imports
  torchtitan's ``Trainer``, whose data loading and metrics need packages that
  torchtitan's install with ``--no-deps`` does not bring (torchdata,
  tensorboard, datasets); a stand-in ``Trainer`` is given to that import only.
  graph_trainer uses it to convert a trainer config, which this method never does.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch import fx, nn

#: The chunked dim of the token grid and the number of chunks (graph_trainer's v1 chunks in two).
CHUNK_DIM = "batch"
CHUNKS = 2

#: graph_trainer passes this method leaves out, through graph_trainer's own ``compile.disable_passes``, and why.
DISABLED_PASSES: dict[str, str] = {
    "joint_transformer_block_bucketing_reordering_pass":
        "FSDP bucketing: its cost estimate needs a GPU (and the bench has no FSDP)",
    "tag_with_memory_policy_pass":
        "activation recompute (SAC): CPU attention (_scaled_dot_product_flash_attention_for_cpu) is tagged "
        "as a random op and its remat refuses those; every activation is saved, as in eager",
    "selective_activation_remat_pass": "activation recompute (SAC), as above",
}

#: The process-local changes (see the module docstring), by key.
CPU_CHANGES: dict[str, str] = {
    "fakeify": "make_fx (torch 2.13): the unbacked symbols of a marked input are dropped from the shape "
               "environment's pending fresh unbacked symbols after _fakeify_input",
    "suffix_insertion": "ep_chunk_pass: the full-size reshape after a materialized MoE-input gradient is "
                        "created at the surrounding insertion point, after the sym_size nodes it reads",
    "trainer_import": "graph_trainer's configs imported with a stand-in torchtitan Trainer (its data loading "
                      "and metrics need torchdata/tensorboard/datasets, not installed)",
}

_ALL_TO_ALL = "all_to_all_single"


class MethodSkipped(RuntimeError):
    """The method cannot run in this configuration (the message says why); the bench reports it and goes on."""


@dataclass
class _GraphTrainer:
    """The graph_trainer functions this method calls (imported once)."""

    tracer: types.ModuleType  # make_fx_tracer
    chunk: types.ModuleType  # ep_chunk_pass
    passes: types.ModuleType
    common: types.ModuleType  # common_utils
    configs: types.ModuleType
    stand_in_trainer: str | None = None  # the missing module that made the Trainer stand-in necessary


_GT: list[_GraphTrainer] = []


def import_graph_trainer() -> _GraphTrainer:
    """graph_trainer's modules; :class:`MethodSkipped` naming the cause when torchtitan is not importable."""
    if _GT:
        return _GT[0]
    try:
        importlib.import_module("torchtitan")
    except ImportError as exc:
        raise MethodSkipped(f"torchtitan is not installed ({exc}); pip install --no-deps torchtitan==0.3.0") from exc
    missing = None
    stand_in = None
    if "torchtitan.trainer" not in sys.modules:
        try:
            importlib.import_module("torchtitan.trainer")
        except ImportError as exc:
            missing = exc.name or str(exc)
            stand_in = types.ModuleType("torchtitan.trainer")
            stand_in.Trainer = type("Trainer", (), {"Config": type("Config", (), {})})  # type: ignore[attr-defined]
            sys.modules["torchtitan.trainer"] = stand_in
    try:
        gt = "torchtitan.experiments.graph_trainer."
        mods = _GraphTrainer(*(importlib.import_module(gt + m) for m in
                               ("make_fx_tracer", "ep_chunk_pass", "passes", "common_utils", "configs")),
                             stand_in_trainer=missing)
    except ImportError as exc:
        raise MethodSkipped(f"torchtitan's graph_trainer is not importable: {exc}") from exc
    finally:
        if stand_in is not None and sys.modules.get("torchtitan.trainer") is stand_in:
            del sys.modules["torchtitan.trainer"]
    _GT.append(mods)
    return mods


def unavailable_reason(model: nn.Module) -> str | None:
    """Why ``torchtitan_graph`` cannot run on ``model`` (None when it can)."""
    from fsmoe_compiler.examples.titan_moe import TitanMoE

    if not isinstance(model, TitanMoE):
        return f"needs --model torchtitan (graph_trainer's EP passes on its MoE layer), not {type(model).__name__}"
    return None


def count_all_to_alls(gm: fx.GraphModule) -> int:
    """all_to_all launches (``_c10d_functional.all_to_all_single``) in ``gm``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and _ALL_TO_ALL in str(n.target))


def all_to_alls_in_flight_together(gm: fx.GraphModule) -> int:
    """all_to_all launches issued while another all_to_all of ``gm`` is in flight (launched, not yet waited):
    what an overlap schedule creates."""
    open_launches: set[fx.Node] = set()
    count = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if _ALL_TO_ALL in str(n.target):
            count += bool(open_launches)
            open_launches.add(n)
        elif "wait_tensor" in str(n.target) and n.args and n.args[0] in open_launches:
            open_launches.discard(n.args[0])
    return count


def _pass_name(pass_fn: Callable) -> str:
    return getattr(getattr(pass_fn, "func", pass_fn), "__name__", repr(pass_fn))


def _recorded(pass_fn: Callable, log: list[dict[str, Any]]) -> Callable:
    """``pass_fn`` under its own name (so disable_passes still matches it), logging what it changed."""
    name = _pass_name(pass_fn)

    def run(gm: fx.GraphModule, example_inputs: Any) -> fx.GraphModule:
        before = [n.name for n in gm.graph.nodes]
        a2a, together = count_all_to_alls(gm), all_to_alls_in_flight_together(gm)
        gm = pass_fn(gm, example_inputs)
        after = [n.name for n in gm.graph.nodes]
        kept_before, kept_after = set(before), set(after)
        old = [n for n in before if n in kept_after]
        new = [n for n in after if n in kept_before]
        log.append({"pass": name, "nodes": [len(before), len(after)], "all_to_all": [a2a, count_all_to_alls(gm)],
                    "in_flight_together": [together, all_to_alls_in_flight_together(gm)],
                    "moved": sum(a != b for a, b in zip(old, new))})
        return gm

    run.__name__ = name
    return run


@contextlib.contextmanager
def _restored_classes(*modules: types.ModuleType) -> Iterator[None]:
    """Put back every class attribute of ``modules`` that the block replaced (graph_trainer's
    ``annotate_moe_ep_regions`` wraps torchtitan's MoE and dispatcher methods process-wide)."""
    classes = [c for m in modules for c in vars(m).values() if isinstance(c, type) and c.__module__ == m.__name__]
    saved = [(c, dict(vars(c))) for c in classes]
    try:
        yield
    finally:
        for c, attrs in saved:
            for k, v in attrs.items():
                if vars(c).get(k) is not v:
                    setattr(c, k, v)


@contextlib.contextmanager
def _annotated(model: nn.Module, gt: _GraphTrainer) -> Iterator[None]:
    """graph_trainer's annotations on ``model`` for the block: module FQNs (decoder blocks as ``layers``)
    and the MoE EP regions (dispatch / combine / token exchanges); all removed afterwards."""
    moe_mod = importlib.import_module("torchtitan.models.common.moe")
    disp_mod = importlib.import_module("torchtitan.models.common.token_dispatcher")
    had_forward = {m for m in model.modules() if "forward" in vars(m)}
    alias = nn.Module()  # the same submodules, named as graph_trainer's models name them
    for name, child in model.named_children():
        setattr(alias, "layers" if name == "blocks" else name, child)
    with _restored_classes(moe_mod, disp_mod), mock.patch.object(gt.common, "_MOE_EP_REGIONS_ANNOTATED", False):
        try:
            gt.common.annotate_moe_ep_regions()
            gt.common.annotate_module_fqns(alias)
            yield
        finally:
            for m in model.modules():
                if m not in had_forward:
                    vars(m).pop("forward", None)


@contextlib.contextmanager
def _fakeify_binds_input_symbols(gt: _GraphTrainer, applied: dict[str, int]) -> Iterator[None]:
    """CPU change ``fakeify`` (see the module docstring), for the block."""
    original = gt.tracer._fakeify_input

    def fakeify(fake_mode: Any, arg: torch.Tensor, *, input_name: str) -> torch.Tensor:
        pending = fake_mode.shape_env.pending_fresh_unbacked_symbols
        n = len(pending)
        out = original(fake_mode, arg, input_name=input_name)
        if len(pending) > n:
            applied["fakeify"] = applied.get("fakeify", 0) + len(pending) - n
            del pending[n:]
        return out

    with mock.patch.object(gt.tracer, "_fakeify_input", fakeify):
        yield


@contextlib.contextmanager
def _suffix_at_insertion_point(gt: _GraphTrainer, applied: dict[str, int]) -> Iterator[None]:
    """CPU change ``suffix_insertion`` (see the module docstring), for the block."""
    original = gt.chunk._materialize_suffix_from_full_boundary

    def materialize(gm: fx.GraphModule, *args: Any, **kwargs: Any) -> fx.Node:
        applied["suffix_insertion"] = applied.get("suffix_insertion", 0) + 1
        with mock.patch.object(gm.graph, "inserting_after", lambda node=None: contextlib.nullcontext()):
            return original(gm, *args, **kwargs)

    with mock.patch.object(gt.chunk, "_materialize_suffix_from_full_boundary", materialize):
        yield


class _GraphGrads(torch.autograd.Function):
    """The loss of a joint graph run; its backward hands the graph's gradients to the parameters."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, grads: list, *params: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.grads = grads
        return loss.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # noqa: D102
        grads, ctx.grads = ctx.grads, None
        if float(grad_out) != 1.0:
            grads = [None if g is None else g * grad_out for g in grads]
        return (None, None, *grads)


@dataclass
class TitanGraphStep:
    """``step(idx, targets) -> loss`` through graph_trainer's traced and EP-overlap-scheduled joint graph.

    Traced and rewritten on the first call (for that batch shape); ``loss.backward()`` fills ``.grad``.
    """

    model: nn.Module
    chunk_dim: str = CHUNK_DIM
    info: dict[str, Any] = field(default_factory=dict)
    traced: Any = None
    shapes: tuple | None = None

    def __post_init__(self) -> None:
        self.gt = import_graph_trainer()
        # graph_trainer's traced step returns one gradient per name (a tied weight appears under each of its
        # names, each time with its whole gradient); autograd gets each parameter once, with its first one
        named = [p for _, p in self.model.named_parameters(remove_duplicate=False) if p.requires_grad]
        self.params = list({id(p): p for p in named}.values())
        self.grad_index = [next(i for i, q in enumerate(named) if q is p) for p in self.params]
        applied: dict[str, int] = {}
        if self.gt.stand_in_trainer:
            applied["trainer_import"] = 1
        self.info.update(chunk_dim=self.chunk_dim, chunks=CHUNKS, cpu_changes=applied,
                         disabled_passes=dict(DISABLED_PASSES))

    def compile(self, idx: torch.Tensor, targets: torch.Tensor) -> None:
        """Trace the joint graph for this batch and apply graph_trainer's passes."""
        gt, model, applied = self.gt, self.model, self.info["cpu_changes"]

        def fwd_bwd(i: torch.Tensor, t: torch.Tensor) -> list:
            loss = model(i, t)  # the parameters here are the tracer's stand-ins: list them again
            params = [p for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
            return [loss, *torch.autograd.grad(loss, params)]

        marked = [idx.clone(), targets.clone()]
        for x in marked:
            gt.chunk.mark_chunk_dynamic_dims(x, mode=self.chunk_dim)
        with _annotated(model, gt), _fakeify_binds_input_symbols(gt, applied):
            traced = gt.tracer.minimal_fx_tracer(fwd_bwd, module=model)(*marked)
        a2a_traced = count_all_to_alls(traced.gm)

        cfg = self._config()
        log: list[dict[str, Any]] = []
        passes = [_recorded(p, log) for p in gt.passes.compile_time_passes(traced, cfg, include_inductor=False)]
        with _suffix_at_insertion_point(gt, applied):
            traced.gm = gt.passes.apply_graph_passes(traced.gm, traced.example_inputs, passes,
                                                     compile_config=cfg.compile)
        self.traced, self.shapes = traced, (tuple(idx.shape), tuple(targets.shape))
        self.info.update(
            passes=log,
            all_to_all={"traced": a2a_traced, "final": count_all_to_alls(traced.gm)},
            scheduled_moved=sum(r["moved"] for r in log if r["pass"] == "ep_overlap_schedule_pass"),
            cpu_changes_text={k: CPU_CHANGES[k] for k in applied},
        )

    def _config(self) -> Any:
        """The slice of a GraphTrainer config that ``compile_time_passes`` reads."""
        c = self.gt.configs
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        blocks = getattr(self.model, "blocks", [])
        compile_cfg = c.GraphTrainerCompileConfig(
            enable=True,
            ep_overlap=c.EpOverlapConfig(enabled=True, chunk_dim=self.chunk_dim, strategy="graph",
                                         module_fqn=c.MOE_BLOCK_FQN),
            disable_passes=list(DISABLED_PASSES),
        )
        return SimpleNamespace(
            model_spec=SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(moe=b.moe) for b in blocks])),
            parallelism=SimpleNamespace(data_parallel_shard_degree=world, context_parallel_degree=1,
                                        tensor_parallel_degree=1, expert_parallel_degree=world,
                                        pipeline_parallel_degree=1, fsdp_reshard_after_forward="default"),
            compile=compile_cfg,
        )

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        shapes = (tuple(idx.shape), tuple(targets.shape))
        if self.traced is None:
            self.compile(idx, targets)
        elif shapes != self.shapes:
            raise ValueError(f"torchtitan_graph traced batch shapes {self.shapes}; got {shapes}")
        loss, *grads = self.gt.tracer.run_traced(self.traced, module=self.model)(idx, targets)
        return _GraphGrads.apply(loss, [grads[i] for i in self.grad_index], *self.params)


def titan_graph_runner(model: nn.Module, chunk_dim: str = CHUNK_DIM) -> TitanGraphStep:
    """The ``torchtitan_graph`` runner for ``model``; :class:`MethodSkipped` when it cannot run on it."""
    reason = unavailable_reason(model)
    if reason:
        raise MethodSkipped(reason)
    return TitanGraphStep(model, chunk_dim=chunk_dim)
