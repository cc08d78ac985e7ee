"""The router × dispatch cases of the reference ``MoELayer`` that the numerics tests check against eager.

(router, dispatch, expert, shared_expert): every router with every dispatch it supports; and how those
tests compare tensors and name parameters.
"""

from __future__ import annotations

CASES = [
    ("gshard", "capacity", "gelu", False),
    ("gshard", "dropless", "gelu", True),
    ("switch", "capacity", "gelu", False),
    ("switch", "dropless", "swiglu", False),
    ("sigmoid", "capacity", "swiglu", False),
    ("sigmoid", "dropless", "gelu", False),
    ("xmoe", "capacity", "gelu", False),
    ("xmoe", "dropless", "gelu", False),
    ("mixtral", "capacity", "swiglu", True),
    ("mixtral", "dropless", "swiglu", False),
    ("deepseek", "capacity", "swiglu", True),
    ("deepseek", "dropless", "swiglu", True),
    ("softmoe", "capacity", "gelu", False),
    ("expert_choice", "capacity", "gelu", False),
]
CASE_IDS = ["-".join(str(c) for c in case) for case in CASES]

# Data-dependent shapes (dropless splits, a per-expert loop's torch.where) captured in one graph.
ONE_GRAPH = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}

#: Tolerance of a chunked or scheduled result against eager's: float reassociation only.
RTOL, ATOL = 1e-4, 1e-5


def violation(got, want) -> float:
    """Largest violation of |got - want| <= ATOL + RTOL |want| over the elements (<= 0 when close)."""
    return float(((got - want).abs() - ATOL - RTOL * want.abs()).max())


def plain_name(name: str) -> str:
    """A parameter's name without the parametrization ``sync_gradients_in_graph`` puts on it."""
    return name.replace("parametrizations.", "").replace(".original", "")
