"""Tabulate tables of the MoE regions found in a graph (no torch: reads records only)."""

from __future__ import annotations

from typing import Any, Iterable

from tabulate import tabulate

ROLE_COLUMNS = ("router", "dispatch", "expert", "combine", "shared_expert")


def _fmt_bytes(n: int | None) -> str:
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
                _fmt_bytes(r.a2a_bytes) if r.all_to_all else "-",
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
