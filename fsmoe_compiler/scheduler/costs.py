"""Linear cost models: ``t(n) = max(floor, alpha + beta * n)`` milliseconds, and their least-squares fit.

FSMoE prices every operation this way: ``n`` is elements or bytes for a
collective and multiply-accumulates for a GEMM, whatever the caller fitted it
on. The profiler fits its link models with :meth:`LinearCost.fit`, the
simulator's presets their cluster models; the scheduler only calls them. Pure
Python: the scheduler never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LinearCost:
    """t(n) = max(floor, alpha + beta * n), in milliseconds; ``floor`` 0 (the default) is the plain line.

    The floor is a link's least time per message where small messages cost
    more than the line through the large ones says (see
    ``profiler.comm.fit_collectives``).
    """

    alpha: float
    beta: float
    floor: float = 0.0

    def __post_init__(self) -> None:
        values = (self.alpha, self.beta, self.floor)
        if min(values) < 0 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"LinearCost needs finite alpha, beta, floor >= 0, got alpha={self.alpha}, "
                             f"beta={self.beta}, floor={self.floor}")

    def __call__(self, n: float) -> float:
        return max(self.floor, self.alpha + self.beta * n)

    @classmethod
    def fit(cls, ns: Sequence[float], ts: Sequence[float]) -> "LinearCost":
        """Least-squares fit of ``t = alpha + beta * n`` to points ``(ns[i], ts[i])``, clamped to alpha, beta >= 0.

        If the unconstrained fit gives a negative intercept (noise on a nearly
        proportional cost) the slope is refitted through the origin; a negative
        slope (cost flat in n) becomes the mean time with beta = 0. ValueError
        for fewer than two points, lengths that differ, or a single distinct n.
        """
        if len(ns) != len(ts) or len(ns) < 2:
            raise ValueError(f"LinearCost.fit needs >= 2 (n, t) pairs of equal length, got {len(ns)} and {len(ts)}")
        k = len(ns)
        mn = sum(ns) / k
        mt = sum(ts) / k
        sxx = sum((n - mn) ** 2 for n in ns)
        if sxx == 0:
            raise ValueError("LinearCost.fit needs at least two distinct sizes n")
        beta = sum((n - mn) * (t - mt) for n, t in zip(ns, ts)) / sxx
        alpha = mt - beta * mn
        if beta < 0:
            return cls(max(mt, 0.0), 0.0)
        if alpha < 0:
            beta = sum(n * t for n, t in zip(ns, ts)) / sum(n * n for n in ns)
            return cls(0.0, max(beta, 0.0))
        return cls(alpha, beta)
