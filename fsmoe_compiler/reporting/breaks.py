"""Dynamo graph breaks as the report shows them: where, the cause in a few words, and the setting that fixes it.

Dynamo hands every graph it compiles to the backend with
``gm.compile_subgraph_reason`` (a ``GraphCompileReason``: the reason text,
the user stack where the graph ended, whether it was a graph break; the same
record ``torch._dynamo.explain`` collects). ``graph_break`` turns one into a
``GraphBreak``; the cause and fix come from ``CAUSES``, a table of rows
evaluated in order (first match wins), so a new cause is a new row.

Pure Python (no torch): it reads the reason's attributes only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["CAUSES", "Cause", "GraphBreak", "LIBRARY_SWITCHES", "graph_break"]

#: library (top-level package) -> the switch that gives its MoE experts an implementation Dynamo traces whole.
LIBRARY_SWITCHES: dict[str, str] = {
    "transformers": "fsmoe_compiler.ecosystem.compile_friendly(model) before torch.compile (it sets "
                    "config._experts_implementation to 'grouped_mm', or 'batched_mm'; "
                    "model.set_experts_implementation(...) does the same)",
    "megatron": "TransformerConfig(moe_grouped_gemm=True) (grouped GEMM experts instead of the per-expert loop)",
}

_SCALAR = "torch._dynamo.config.capture_scalar_outputs = True"
_DYNAMIC = "torch._dynamo.config.capture_dynamic_output_shape_ops = True"


@dataclass
class GraphBreak:
    """One Dynamo graph break: what Dynamo said, where (innermost user frame first in ``where``), cause and fix.

    ``frames`` are ``(file, line, function, source)`` from the outermost user
    frame to the innermost; ``library`` is the installed package the break is
    in (None for user code); ``cause`` names the row of ``CAUSES`` that matched.
    """

    reason: str  # Dynamo's first line
    text: str  # Dynamo's whole message
    frames: list[tuple[str, int, str, str]] = field(default_factory=list)
    library: str | None = None
    cause: str = "other"
    what: str = ""  # the cause in words
    fix: str = ""  # the setting or switch that removes the break

    @property
    def where(self) -> str:
        if not self.frames:
            return "<unknown>"
        file, line, func, source = self.frames[-1]
        return f"{file}:{line} in {func}" + (f": {source}" if source else "")

    def __str__(self) -> str:
        return f"Dynamo graph break at {self.where}: {self.what}; fix: {self.fix}"


@dataclass(frozen=True)
class Cause:
    """A row of ``CAUSES``: a name, a predicate over the break, the cause in words and its fix."""

    name: str
    matches: Callable[[GraphBreak], bool]
    what: Callable[[GraphBreak], str]
    fix: Callable[[GraphBreak], str]


def _loop_line(b: GraphBreak) -> bool:
    return any(src.lstrip().startswith("for ") for _, _, _, src in b.frames[-1:])


def _data_dependent(b: GraphBreak) -> bool:
    return "data-dependent" in b.text or b.reason.strip() == "step_unsupported"


def _hints(b: GraphBreak) -> str:
    hints = [line.strip().removeprefix("Hint:").strip() for line in b.text.splitlines()
             if line.strip().startswith("Hint:") and "report an issue" not in line]
    return " ".join(hints) if hints else "see Dynamo's message: " + b.reason


CAUSES: tuple[Cause, ...] = (
    Cause("print", lambda b: "`print`" in b.text or "builtin print" in b.text,
          lambda b: "a print() call (Dynamo does not put Python I/O in a graph)",
          lambda b: "remove the print, or let Dynamo run it after the graph: "
                    "torch._dynamo.config.reorderable_logging_functions.add(print)"),
    Cause("item", lambda b: "capture_scalar_outputs" in b.text,
          lambda b: "Tensor.item()/tolist() with torch._dynamo.config.capture_scalar_outputs off",
          lambda b: f"{_SCALAR} (importing fsmoe_compiler.moe sets it)"),
    Cause("nonzero", lambda b: "capture_dynamic_output_shape_ops" in b.text or "Dynamic shape operator" in b.reason,
          lambda b: "an op whose output shape depends on the data (nonzero, where(mask), unique, ...) with "
                    "torch._dynamo.config.capture_dynamic_output_shape_ops off",
          lambda b: _DYNAMIC),
    Cause("library expert loop", lambda b: b.library is not None and _data_dependent(b) and _loop_line(b),
          lambda b: f"a Python loop over data-dependent values in the {b.library} package (an expert loop over "
                    "nonzero() of expert hits)",
          lambda b: LIBRARY_SWITCHES.get(b.library or "", f"{b.library}'s setting for an expert implementation "
                                                          "without a Python loop (grouped GEMM)")),
    Cause("data-dependent loop", lambda b: _data_dependent(b) and _loop_line(b),
          lambda b: "a Python loop over data-dependent values (e.g. over nonzero() of expert hits)",
          lambda b: "loop over range(num_experts) with a mask, or run the experts as one grouped GEMM / bmm"),
    Cause("data-dependent", _data_dependent,
          lambda b: "Python control flow on a data-dependent value",
          lambda b: "torch._check(...) the value's range, or keep the decision on tensors (torch.where, masks); "
                    + _hints(b)),
    Cause("other", lambda b: True, lambda b: b.reason, _hints),
)

_PACKAGE = re.compile(r"[/\\](?:site|dist)-packages[/\\]([A-Za-z_][A-Za-z0-9_]*)")


def _library(frames: list[tuple[str, int, str, str]]) -> str | None:
    """The installed package of the innermost frame, or None for user code (torch itself is not a library here)."""
    m = _PACKAGE.search(frames[-1][0]) if frames else None
    return m.group(1) if m and m.group(1) not in ("torch", "fsmoe_compiler") else None


def graph_break(reason: Any) -> GraphBreak | None:
    """The ``GraphBreak`` of Dynamo's ``GraphCompileReason``; None when the graph was not ended by a break."""
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = str(getattr(reason, "reason", ""))
    frames = []
    for f in getattr(reason, "user_stack", None) or []:
        frames.append((str(getattr(f, "filename", "?")), int(getattr(f, "lineno", 0) or 0),
                       str(getattr(f, "name", "?")), str(getattr(f, "line", "") or "").strip()))
    b = GraphBreak(reason=text.strip().splitlines()[0] if text.strip() else "graph break", text=text, frames=frames)
    b.library = _library(frames)
    for cause in CAUSES:
        if cause.matches(b):
            b.cause, b.what, b.fix = cause.name, cause.what(b), cause.fix(b)
            break
    return b
