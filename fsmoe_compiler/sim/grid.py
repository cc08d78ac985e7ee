"""Layer grids for the simulator, starting with FSMoE's 1458 MoE layers.

FSMoE (ASPLOS'25) evaluates on 1458 configured MoE layers, 1458 = 2 * 3^6: six
parameters with three values each and one with two. Our grid (the values are
inferred from the paper and its code, see ``shared/FSMOE.md``):

=========  ==========================  ===========================================
parameter  values                      meaning
=========  ==========================  ===========================================
B          2, 4, 8                     micro-batch per GPU (sequences)
L          256, 512, 1024              sequence length (tokens)
M          1024, 2048, 4096            model (hidden) width
H/M        2, 4, 8                     expert FFN hidden width as a multiple of M
f          1.2, 2.4, 4.8               top-k x capacity factor
GPUs       16, 32, 48                  8 per node, expert sharding ESP = 8 (a node)
FFN        gpt, swiglu                 2-GEMM GPT FFN or 3-GEMM SwiGLU FFN
=========  ==========================  ===========================================

Points are enumerated in the order of :data:`FSMOE_GRID_AXES` (last axis
fastest), so ``fsmoe_grid()[:N]`` is a stable slice for ``--limit N``.
"""

from __future__ import annotations

import itertools
import re
from fsmoe_compiler.sim.costs import FFN_GEMMS, LayerSpec

GPUS_PER_NODE = 8
ESP = 8

#: The axes of FSMoE's grid, in enumeration order (the last varies fastest).
FSMOE_GRID_AXES: dict[str, tuple] = {
    "gpus": (16, 32, 48),
    "ffn": ("gpt", "swiglu"),
    "B": (2, 4, 8),
    "L": (256, 512, 1024),
    "M": (1024, 2048, 4096),
    "HM": (2, 4, 8),  # H / M
    "f": (1.2, 2.4, 4.8),
}
FSMOE_GRID_SIZE = 1458


def fsmoe_grid() -> list[LayerSpec]:
    """FSMoE's 1458 MoE layers as ``LayerSpec`` (8 GPUs per node, ESP = 8)."""
    axes = FSMOE_GRID_AXES
    out = [
        LayerSpec(B=B, L=L, M=M, H=hm * M, f=f, gpus=gpus, gpus_per_node=GPUS_PER_NODE, esp=ESP, ffn=ffn)
        for gpus, ffn, B, L, M, hm, f in itertools.product(
            axes["gpus"], axes["ffn"], axes["B"], axes["L"], axes["M"], axes["HM"], axes["f"]
        )
    ]
    assert len(out) == FSMOE_GRID_SIZE
    return out


GRIDS = {"fsmoe": fsmoe_grid}


def get_grid(name: str) -> list[LayerSpec]:
    """The grid called ``name``; ValueError naming the valid grids."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; valid grids: {', '.join(sorted(GRIDS))}")
    return GRIDS[name]()


# ---------------------------------------------------------------------------
# --config parsing: "B=4,L=512,M=2048,H=8192,f=2.4,gpus=32,ffn=gpt"
# ---------------------------------------------------------------------------

_INT_KEYS = ("B", "L", "M", "H", "gpus", "gpus_per_node", "esp", "num_experts", "dense_params")
_FLOAT_KEYS = ("f",)
_STR_KEYS = ("ffn",)
CONFIG_KEYS = _INT_KEYS + _FLOAT_KEYS + _STR_KEYS
_REQUIRED = ("B", "L", "M", "f")
#: Defaults for keys a --config may leave out (H defaults to 4 * M).
CONFIG_DEFAULTS = {"gpus": 16, "gpus_per_node": GPUS_PER_NODE, "esp": ESP, "ffn": "gpt"}


class ConfigError(ValueError):
    """A malformed ``--config`` string; the message names the bad part and the valid choices."""


def parse_config(text: str) -> LayerSpec:
    """Parse ``"B=4,L=512,M=2048,H=8192,f=2.4,gpus=32,ffn=gpt"`` into a LayerSpec.

    Required: B, L, M, f. Optional: H (default 4*M, or give ``HM=``), gpus (16),
    gpus_per_node (8), esp (8), ffn (gpt), num_experts, dense_params. Raises
    :class:`ConfigError` (a ValueError) naming the bad key or value and the
    valid choices.
    """
    if not text or not text.strip():
        raise ConfigError(f"empty --config; expected KEY=VALUE pairs separated by commas, keys: {', '.join(CONFIG_KEYS)}")
    vals: dict[str, object] = {}
    hm: int | None = None
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"--config item {part!r} is not KEY=VALUE; keys: {', '.join(CONFIG_KEYS + ('HM',))}")
        key, raw = (s.strip() for s in part.split("=", 1))
        if key in vals or (key == "HM" and hm is not None):
            raise ConfigError(f"--config key {key!r} given twice")
        try:
            if key == "HM":
                hm = int(raw)
            elif key in _INT_KEYS:
                vals[key] = int(raw)
            elif key in _FLOAT_KEYS:
                vals[key] = float(raw)
            elif key in _STR_KEYS:
                if raw not in FFN_GEMMS:
                    raise ConfigError(f"--config ffn={raw!r} is not valid; valid ffn: {', '.join(sorted(FFN_GEMMS))}")
                vals[key] = raw
            else:
                raise ConfigError(f"unknown --config key {key!r}; valid keys: {', '.join(CONFIG_KEYS + ('HM',))}")
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            kind = "an integer" if key in _INT_KEYS or key == "HM" else "a number"
            raise ConfigError(f"--config {key}={raw!r} is not {kind}") from None
    missing = [k for k in _REQUIRED if k not in vals]
    if missing:
        raise ConfigError(f"--config is missing {', '.join(missing)}; required keys: {', '.join(_REQUIRED)}")
    if "H" not in vals:
        vals["H"] = (hm if hm is not None else 4) * int(vals["M"])  # type: ignore[arg-type]
    elif hm is not None:
        raise ConfigError("--config gives both H and HM; give one")
    for k, v in CONFIG_DEFAULTS.items():
        vals.setdefault(k, v)
    try:
        return LayerSpec(**vals)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(f"invalid --config {text!r}: {e}") from None
