"""Tabulate tables of the MoE regions found in a graph (no torch: reads records only)."""

from __future__ import annotations

from typing import Any, Iterable

from tabulate import tabulate

ROLE_COLUMNS = ("router", "dispatch", "expert", "combine", "shared_expert")


def fmt_bytes(n: int | None) -> str:
    """``n`` bytes in B, KiB, MiB or GiB ("symbolic" for None)."""
    if n is None:
        return "symbolic"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def regions_table(regions: Iterable[Any], tablefmt: str = "simple") -> str:
    """One row per region: shape of the layer, node counts per role, all-to-all bytes."""
    rows = []
    for r in regions:
        rows.append(
            [
                r.layer,
                r.router,
                _dash(r.num_experts),
                _dash(r.top_k),
                "dropless" if r.dropless else _dash(r.capacity),
                _dash(r.tokens),
                _dash(r.hidden),
                _dash(r.ffn_hidden),
                *[len(r.nodes.get(role, [])) for role in ROLE_COLUMNS],
                len(r.all_to_all),
                fmt_bytes(r.a2a_bytes) if r.all_to_all else "-",
            ]
        )
    headers = [
        "layer", "router", "experts", "top-k", "capacity", "tokens", "hidden", "ffn",
        "router\nnodes", "dispatch\nnodes", "expert\nnodes", "combine\nnodes", "shared\nnodes",
        "a2a", "a2a bytes",
    ]
    return tabulate(rows, headers=headers, tablefmt=tablefmt)


def roles_table(regions: Iterable[Any], max_names: int | None = 8, tablefmt: str = "simple") -> str:
    """The node names in each role of each region (truncated to ``max_names`` unless None)."""
    rows = []
    for r in regions:
        for role in ROLE_COLUMNS:
            names = list(r.nodes.get(role, []))
            if not names:
                continue
            shown = names if max_names is None else names[:max_names]
            text = ", ".join(shown)
            if len(shown) < len(names):
                text += f", ... (+{len(names) - len(shown)} more)"
            rows.append([r.layer, role, len(names), text])
        if r.all_to_all:
            rows.append([r.layer, "all_to_all", len(r.all_to_all), ", ".join(r.all_to_all)])
    return tabulate(rows, headers=["layer", "role", "nodes", "names"], tablefmt=tablefmt, maxcolwidths=[None, None, None, 100])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _codegen_words(sched: Any) -> str:
    """How the prediction relates to Inductor's code, when that is what ran."""
    if sched.codegen != "inductor":
        return ""
    if sched.calibration_from == "cache":
        return (f" of Inductor's code; predicted: the plain graph's profile, {sched.predicted_ms:.3f} ms, times "
                f"{sched.calibration:.3f} learned by an earlier run")
    words = " of Inductor's code; predicted from the plain graph's profile"
    if sched.calibration is not None:
        words += (f"; Inductor's code ran at {sched.calibration:.3f}x the plain graph's timed call, so "
                  f"{sched.codegen_predicted_ms:.3f} ms is predicted from now on")
    return words


def link_models_text(links: dict) -> str:
    """``{key: (alpha ms, ms per MiB, host CPU share or None[, floor ms])}`` as one line, by key."""
    def one(k: str, a: float, b: float, share: float | None, floor: float = 0.0) -> str:
        return (f"{k} {a:.3f} ms + {b:.3f} ms/MiB" + (f", at least {floor:.3f} ms" if floor else "")
                + ("" if share is None else f", host CPU share {share:.2f}"))
    return "; ".join(one(k, *v) for k, v in sorted(links.items()))


def _calls_words(sched: Any) -> str:
    """Which calls the measurement is the median of."""
    if not sched.aligned_calls_ms:
        return f"{len(sched.measured_calls_ms)} call(s)"
    return (f"{len(sched.aligned_calls_ms)} call(s), each from the last rank's entry; this rank's own "
            f"{_ms(sched.own_ms)} ms includes its wait for the others to arrive")


def schedule_summary(sched: Any) -> str:
    """Scheduler, degree per layer, predicted makespan per candidate degree, predicted vs measured graph time, peak
    memory against the graph as traced."""
    measured = sched.measured_ms
    cached = sched.calibration_from == "cache"  # the prediction for the compiled code, from an earlier run's factor
    predicted = sched.codegen_predicted_ms if cached else sched.predicted_ms
    err = "-" if measured is None else f"{100.0 * (predicted - measured) / measured:+.1f} %"
    lines = [
        f"scheduler {sched.scheduler} ({sched.status}); degree per layer: "
        + (", ".join(f"L{layer}={d}" for layer, d in sorted(sched.degrees.items())) or "-")
        + "; candidates: " + ", ".join(f"r={d}: {ms:.3f} ms" for d, ms in sorted(sched.candidates.items())),
        f"predicted {predicted:.3f} ms, measured {_ms(measured)} ms (median of "
        + _calls_words(sched) + _codegen_words(sched)
        + f"), error {err}; planning {sched.plan_s:.2f} s, "
        + ("profile from cache" if sched.cache_hit else f"profiled in {sched.profile_calls} call(s)"),
    ]
    if sched.links:
        lines.append("link models (measured): " + link_models_text(sched.links))
    peak, traced = sched.peak_bytes, sched.traced_peak_bytes
    if peak is not None and traced:
        lines.append(f"peak memory in graph order (tensors alive, inputs included): scheduled {fmt_bytes(peak)}, "
                     f"as traced {fmt_bytes(traced)} ({100.0 * (peak - traced) / traced:+.1f} %)")
    if sched.reference_ms:
        lines.append("same task graph and costs: " + ", ".join(
            f"{name.replace('_', ' ')} {ms:.3f} ms" for name, ms in sched.reference_ms.items()))
    return "\n".join(lines)


def tasks_table(sched: Any, tablefmt: str = "simple", limit: int | None = None) -> str:
    """One row per task: resource, layer/chunk/role, predicted start/end and measured start/end (ms)."""
    rows = []
    for t in sched.tasks[:limit]:
        measured = None
        if t.measured_start_ms is not None and t.measured_end_ms is not None:
            measured = t.measured_end_ms - t.measured_start_ms
        rows.append([t.task, t.resource, t.layer, "-" if t.chunk < 0 else t.chunk, t.role or "-",
                     f"{t.start_ms:.3f}", f"{t.end_ms:.3f}", f"{t.end_ms - t.start_ms:.3f}",
                     _ms(t.measured_start_ms), _ms(t.measured_end_ms), _ms(measured)])
    headers = ["task", "resource", "layer", "chunk", "role", "pred start", "pred end", "pred ms",
               "meas start", "meas end", "meas ms"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt)
