"""``FSMoEConfig``: the backend's options, validated with errors that name the bad value.

``torch.compile(model, backend="fsmoe", options={...})`` hands ``options`` to the
backend; ``FSMoEConfig.from_options`` turns it into this dataclass or raises a
``ValueError`` naming the unknown key or bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping


#: Values of the ``scheduler`` option.
SCHEDULERS = ("cpsat", "heuristic", "tutel", "sequential", "none")
#: Values of the ``codegen`` option.
CODEGENS = ("eager", "inductor")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")


@dataclass(frozen=True)
class FSMoEConfig:
    """Options of the fsmoe backend.

    strict: raise instead of falling back to the unmodified graph when a pass
        cannot apply or a region is only partly understood.
    check_ranks: when torch.distributed is initialised with more than one rank,
        compare the regions every rank found at a program point and raise if
        they differ, and vote at every call of a scheduled graph so that a
        rank that compiled other graphs makes that call run as traced on all
        ranks (ranks that disagree would otherwise issue collectives in
        different orders).
    dump_dir: if set, write each graph's code there: before and after the passes, and the scheduled graph
        once profiling ends (with each node's task and stream).
    scheduler: how MoE regions are chunked and ordered: "cpsat" (CP-SAT over
        the measured task graph, started from the best of the next three; the
        default), "heuristic" (the best of list scheduling and the "tutel" and
        "sequential" orders), "tutel" (Tutel's schedule: compute stage by stage,
        collectives issued as soon as their inputs are ready; see
        ``fsmoe_compiler.names``), "sequential" (no chunking, no reordering: the
        baseline) or "none" (recognise and report only; no profiling, the graph
        runs as traced).
    pipeline_degree: chunks per MoE region (an int >= 1) or "auto" (the
        scheduler picks among powers of two up to ``max_degree``).
    max_degree: the largest degree "auto" tries.
    profile_steps: calls of each graph that run under the timing interpreter
        before the scheduled graph is swapped in (they compute the same results);
        they cycle through the candidate degrees, and each node costs the
        median of its degree's steady calls (the faster half by summed time: a variant's first call after
        another ran pays for touching its buffers; the typical steady-state call, not the undisturbed best).
    measure_steps: calls after the swap that run timed per task, for the
        report's predicted-vs-measured columns.
    cache_dir: directory of the JSON profile cache (None: no cache); a hit
        skips profiling.
    time_limit_s: CP-SAT's deterministic time limit per solve.
    split_tokens: run expert-parallel dropless MoE layers on token ranges split before routing, each range
        with its own count exchange, all-to-alls and experts, so the ranges pipeline against each other:
        "auto" (for a layer whose all-to-alls cannot be chunked after dispatch, the whole graph and 2, 4 and
        8 ranges of at least 256 tokens are compiled, measured in turn and the fastest kept; the default), an
        int > 1 (that many ranges for every such dropless layer) or 1 (never). Applied to Dynamo's graph
        before autograd, so both graphs hold the ranges.
    narrow_comm: send an all-to-all in bf16/fp16 where that gives the same bits: its receiver only casts
        the payload to that dtype, or its sender cast it from that dtype (``passes.narrow_comm``).
    max_peak_growth: how much more tensor memory the scheduled order may keep alive at once than the graph
        as traced (0.5: 50 % more; ``memory.peak_bytes`` in graph order). Issuing exchanges early and waiting
        late keeps buffers alive longer; a schedule over the bound runs in the traced order of its chunks
        instead, with a note (``strict=True`` raises). None: no bound.
    max_in_flight_mb: how many MB of collective buffers (inputs and outputs: PyTorch's own estimate,
        ``estimate_fx_collective_memory_footprint``, or twice the bytes the profile saw sent where sizes are
        known only at run time) may be issued and not yet waited on at once in the
        scheduled order; a collective that would go over it waits for the oldest ones first (as PyTorch's
        overlap scheduler bounds ``max_in_flight_gb``; 5 GB there too). None: no bound.
    codegen: how the graph fsmoe chose runs: "eager" (its ATen ops called from Python, as ``aot_eager``
        runs a graph) or "inductor" (compiled by Inductor, with fused kernels, the schedule's communication
        order pinned and checked in the generated code; ``fsmoe_compiler.inductor_codegen``). Profiling runs
        the plain graphs either way; a graph Inductor cannot compile runs as Python code, with a note.
    grad_partition: how the backward graph's gradient all-reduces (``sync_gradients_in_graph``) are sent:
        "off" (one per parameter, as traced; the default), an int > 0 (merged into partitions of at most
        that many bytes, in the order the gradients appear) or "auto" (the cap whose schedule the measured
        costs price fastest; ``passes.partition_grads``).
    """

    strict: bool = False
    check_ranks: bool = True
    dump_dir: str | None = None
    scheduler: str = "cpsat"
    pipeline_degree: int | str = "auto"
    max_degree: int = 4
    profile_steps: int = 6
    measure_steps: int = 1
    cache_dir: str | None = None
    time_limit_s: float = 0.25
    split_tokens: int | str = "auto"
    narrow_comm: bool = True
    max_peak_growth: float | None = 0.5
    max_in_flight_mb: float | None = 5120.0
    codegen: str = "eager"
    grad_partition: int | str = "off"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "FSMoEConfig" | None) -> "FSMoEConfig":
        """Validate ``options`` (a mapping, a config, or None) into a config."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"fsmoe options must be a dict or FSMoEConfig, got {type(options).__name__}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"unknown fsmoe option {key!r}; valid options are: {', '.join(valid)}"
                )
        config = cls(**dict(options))
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError for a value of the wrong kind."""
        for name in ("strict", "check_ranks", "narrow_comm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"fsmoe option {name!r} must be True or False, got {value!r}")
        for name in ("dump_dir", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"fsmoe option {name!r} must be a directory path (str) or None, got {value!r}")
            if value is not None and os.path.exists(value) and not os.path.isdir(value):
                raise ValueError(f"fsmoe option {name!r} must name a directory (made if missing), but {value!r} is "
                                 "a file")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"fsmoe option 'scheduler' must be one of {', '.join(map(repr, SCHEDULERS))}, got {self.scheduler!r}"
            )
        if self.codegen not in CODEGENS:
            raise ValueError(
                f"fsmoe option 'codegen' must be one of {', '.join(map(repr, CODEGENS))}, got {self.codegen!r}"
            )
        r = self.pipeline_degree
        if r != "auto" and not (_is_int(r) and r >= 1):
            raise ValueError(f"fsmoe option 'pipeline_degree' must be an int >= 1 or 'auto', got {r!r}")
        for name, low in (("max_degree", 1), ("profile_steps", 1), ("measure_steps", 0)):
            value = getattr(self, name)
            if not (_is_int(value) and value >= low):
                raise ValueError(f"fsmoe option {name!r} must be an int >= {low}, got {value!r}")
        gp = self.grad_partition
        if gp not in ("off", "auto") and not (_is_int(gp) and gp > 0):
            raise ValueError(f"fsmoe option 'grad_partition' must be 'off', 'auto' or a number of bytes > 0 "
                             f"(an int), got {gp!r}")
        st = self.split_tokens
        if st != "auto" and not (_is_int(st) and st >= 1):
            raise ValueError(f"fsmoe option 'split_tokens' must be an int >= 1 or 'auto', got {st!r}")
        g = self.max_peak_growth
        if g is not None and not (_is_finite_number(g) and g >= 0):
            raise ValueError(f"fsmoe option 'max_peak_growth' must be a number >= 0 (a share: 0.5 is 50 % more "
                             f"memory than the graph as traced) or None (no bound), got {g!r}")
        f = self.max_in_flight_mb
        if f is not None and not (_is_finite_number(f) and f > 0):
            raise ValueError(f"fsmoe option 'max_in_flight_mb' must be a number of MB > 0 or None (no bound), "
                             f"got {f!r}")
        t = self.time_limit_s
        if not (_is_finite_number(t) and t > 0):
            raise ValueError(f"fsmoe option 'time_limit_s' must be a number of seconds > 0, got {t!r}")

    def degrees(self) -> list[int]:
        """The pipeline degrees to profile and compare: one fixed degree, or powers of two up to max_degree."""
        if self.scheduler in ("sequential", "none"):
            return [1]
        if self.pipeline_degree != "auto":
            return [int(self.pipeline_degree)]
        out, r = [], 1
        while r <= self.max_degree:
            out.append(r)
            r *= 2
        return out

    def __post_init__(self) -> None:
        self.validate()
