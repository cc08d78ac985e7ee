"""``compile_friendly(model)``: switch known libraries' MoE modules to an expert implementation Dynamo traces whole.

Some libraries run their experts, by default or by a setting, as a Python loop
over the experts that were hit (``nonzero()`` of an expert mask). Dynamo
cannot trace a loop whose length is data: it breaks the graph inside the MoE
layer, and no backend sees the layer whole (``fsmoe_compiler.report`` then
shows several graphs with no region and a note on the routing left alone).
These libraries also ship an implementation without that loop, chosen by a
setting; ``compile_friendly`` sets it and returns what it changed.

Known libraries (one switcher each in ``SWITCHERS``):

* **HF transformers**: an experts module decorated with
  ``@use_experts_implementation`` (``MixtralExperts``, ``Qwen3MoeExperts``,
  ``DeepseekV3Experts`` and the other MoE models') picks its forward from
  ``config._experts_implementation``. ``"eager"``, and ``None`` (a block built
  from a config outside a ``PreTrainedModel``), is the loop;
  ``"grouped_mm"`` (the library's default for models: a sort-based dropless
  permutation and a grouped GEMM) and ``"batched_mm"`` (expert weights
  gathered per token and ``bmm``) trace as one graph. A ``PreTrainedModel``
  is switched with its own ``set_experts_implementation(...)``; other modules
  on the config each experts module reads. The same switch by hand:
  ``AutoModelForCausalLM.from_pretrained(..., experts_implementation="grouped_mm")``
  or ``model.set_experts_implementation("grouped_mm")``. transformers 5.25
  already gives a ``PreTrainedModel`` ``"grouped_mm"`` unless asked
  otherwise, so the switch matters for a model loaded with
  ``experts_implementation="eager"`` and for a bare MoE block built from a
  config (``None``). The CUDA kernels ``"deepgemm"`` and ``"sonicmoe"`` are
  left as they are (not the loop; not tested here, they need a GPU).

Imports nothing of this project and no library: a library that is not
imported has no modules in the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Switch", "compile_friendly", "SWITCHERS", "HF_SETTING", "HF_TRACEABLE"]

#: The HF transformers setting an experts module reads its implementation from.
HF_SETTING = "config._experts_implementation"
#: HF transformers experts implementations Dynamo traces as one graph (the first is the one switched to).
HF_TRACEABLE = ("grouped_mm", "batched_mm")


@dataclass(frozen=True)
class Switch:
    """One module switched: where it is in the model, which library and setting, the value before and after."""

    module: str  # qualified name in the model ("" for the model itself)
    library: str
    setting: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.module or '<model>'}: {self.library} {self.setting} {self.before!r} -> {self.after!r}"


def _hf_experts_modules(model: Any) -> list[tuple[str, Any]]:
    """HF experts modules of ``model``: transformers classes with the attributes ``use_experts_implementation`` adds."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__module__.startswith("transformers.") and hasattr(m, "_is_expert_parallel")
            and hasattr(getattr(m, "config", None), "_experts_implementation")]


def _switch_hf(model: Any, implementation: str | None) -> list[Switch]:
    """Set every HF experts module that runs the expert loop to a traceable implementation."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    experts = _hf_experts_modules(model)
    looping = [(name, m, m.config._experts_implementation) for name, m in experts
               if m.config._experts_implementation in (None, "eager")]
    if not looping:
        return []
    wanted = implementation or HF_TRACEABLE[0]
    if isinstance(model, transformers.PreTrainedModel) and hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(wanted)
        except (ValueError, ImportError, KeyError):  # e.g. grouped_mm cannot dispatch for this model: the other one
            if implementation is not None:
                raise
            wanted = HF_TRACEABLE[1]
            model.set_experts_implementation(wanted)
    for _, m, _ in looping:  # modules whose config the model's setter did not reach (or a bare block)
        if m.config._experts_implementation in (None, "eager"):
            m.config._experts_implementation = wanted
    return [Switch(name, "transformers", HF_SETTING, before, m.config._experts_implementation)
            for name, m, before in looping]


#: library -> switcher(model, implementation or None) -> the switches it made.
SWITCHERS: dict[str, Callable[[Any, str | None], list[Switch]]] = {"transformers": _switch_hf}


def compile_friendly(model: Any, *, experts_implementation: str | None = None) -> list[Switch]:
    """Switch ``model``'s MoE modules from known libraries to an expert implementation Dynamo traces as one graph.

    HF transformers: sets ``config._experts_implementation`` (through
    ``PreTrainedModel.set_experts_implementation`` where the model has it) from
    ``"eager"`` or unset to ``experts_implementation``, by default
    ``"grouped_mm"`` (``"batched_mm"`` where grouped_mm cannot dispatch).
    Modules already on another implementation are left as they are. Returns
    one ``Switch`` per module changed (empty when nothing needed it); call it
    before ``torch.compile``.
    """
    if experts_implementation is not None and experts_implementation not in HF_TRACEABLE:
        raise ValueError(f"experts_implementation must be one of {HF_TRACEABLE} (they trace as one graph), "
                         f"got {experts_implementation!r}")
    out: list[Switch] = []
    for switch in SWITCHERS.values():
        out.extend(switch(model, experts_implementation))
    return out
