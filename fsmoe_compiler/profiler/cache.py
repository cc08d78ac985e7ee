"""A JSON cache of cost models, keyed by what the measurements depend on, so profiling runs once.

``profile_key(gm, world)`` hashes the hardware (CPU, core and thread count,
CUDA device name), the torch version, the world layout (world size and group
sizes) and the graph (each node's target and output shapes/dtypes). It never
hashes process-group names or ranks: group names are assigned per run, and
every rank must find the same entry. ``ProfileCache`` stores one file per key,
written atomically (temporary file + ``os.replace``) so a crash or a second
rank writing the same entry never leaves half a file; a file that cannot be
read, that holds another key or schema, or whose costs are NaN, negative,
absurd or leave nodes of the graph without a time (a hand-edited or foreign
file: the scheduler would price those nodes at 0) is ignored with a warning
naming it and what is wrong, and the graph is profiled again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.fx as fx

from fsmoe_compiler.profiler.costs import SCHEMA, CostModel
from fsmoe_compiler.ops import collective_group_size, collective_kind, is_collective

#: Version of the key recipe and of the cache file layout.
CACHE_SCHEMA = 1


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), '' elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def hardware_info() -> dict:
    """What makes timings from this machine comparable: CPU, cores, torch threads, CUDA device."""
    info = {
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return info


def _target_name(target: Any) -> str:
    """A run-independent name of a node target (no object addresses)."""
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    qual = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return f"{module}.{qual}"


def _describe_val(val: Any) -> Any:
    """Shapes and dtypes of a node's ``meta["val"]`` (tensors, nested tuples, scalars)."""
    if isinstance(val, torch.Tensor):
        return [[str(s) for s in val.shape], str(val.dtype)]
    if isinstance(val, (list, tuple)):
        return [_describe_val(v) for v in val]
    if val is None or isinstance(val, (bool, int, float, str)):
        return repr(val)
    return str(val)  # SymInt / SymFloat: its expression


def _world_info(world: Any) -> dict:
    """World size and group sizes of ``world`` (a WorldLayout, a mapping, an int or None); never ranks or names."""
    if world is None:
        import torch.distributed as dist

        return {"world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1}
    if isinstance(world, int):
        return {"world_size": world}
    if isinstance(world, Mapping):
        return {
            str(k): v for k, v in sorted(world.items(), key=lambda kv: str(kv[0]))
            if "rank" not in str(k) and "name" not in str(k)
        }
    if hasattr(world, "world_size"):
        out = {"world_size": int(world.world_size)}
        for attr in ("ep_size", "dp_size"):
            if hasattr(world, attr):
                out[attr] = int(getattr(world, attr))
        return out
    raise TypeError(f"profile_key: world must be a WorldLayout, a mapping, an int or None, got {type(world).__name__}")


def graph_fingerprint(gm: fx.GraphModule) -> list:
    """Per node in graph order: op, target name and output shapes/dtypes (no names of groups or nodes)."""
    rows = []
    for n in gm.graph.nodes:
        if n.op == "output":
            rows.append(["output"])
            continue
        val = n.meta.get("val", n.meta.get("tensor_meta"))
        target = "" if n.op == "placeholder" else _target_name(n.target)
        rows.append([n.op, target, _describe_val(val)])
    return rows


def key_payload(gm: fx.GraphModule, world: Any = None) -> dict:
    """What ``profile_key`` hashes (JSON-able; for debugging a cache miss)."""
    groups = sorted({(collective_kind(n), collective_group_size(n) or 0) for n in gm.graph.nodes if is_collective(n)})
    return {
        "schema": [CACHE_SCHEMA, SCHEMA],
        "hardware": hardware_info(),
        "torch": torch.__version__,
        "world": _world_info(world),
        "groups": [list(g) for g in groups],
        "graph": graph_fingerprint(gm),
    }


def profile_key(gm: fx.GraphModule, world: Any = None) -> str:
    """sha256 hex key of (hardware, torch version, world layout, collectives' group sizes, graph)."""
    payload = key_payload(gm, world)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def sources_digest() -> str:
    """sha256 of the passes' and the profiler's sources: a cost table is keyed by node names these produce."""
    h = hashlib.sha256()
    for package in ("fsmoe_compiler.passes", "fsmoe_compiler.profiler"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"cannot locate the sources of {package}")
        for path in sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def plan_key(gm: fx.GraphModule, world: Any, kind: str, degree: int, settings: str) -> str:
    """The cache key of ``gm`` chunked to ``degree``: ``profile_key`` plus the pass sources and solver ``settings``.

    Never process-group names or ranks, so every rank and every run of the same
    job on the same machines finds the same file.
    """
    return hashlib.sha256(f"{profile_key(gm, world)}/{sources_digest()}/{settings}/{kind}/degree{degree}"
                          .encode()).hexdigest()


class ProfileCache:
    """Cost models on disk, one ``profile-<key>.json`` per key under ``directory``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"profile-{key}.json"

    def load(self, key: str, graph: fx.Graph | None = None) -> CostModel | None:
        """The stored model of ``key``; None if absent, or (with a warning naming the file and what is wrong)
        unusable: unreadable, another schema or key, or contents that cannot price ``graph``
        (``CostModel.problems``: NaN, negative or absurd costs, nodes without a time)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            warnings.warn(f"ignoring profile cache {path}: not readable JSON ({e})", stacklevel=2)
            return None
        if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            warnings.warn(f"ignoring profile cache {path}: schema {found!r}, expected {CACHE_SCHEMA}", stacklevel=2)
            return None
        if data.get("key") != key:
            warnings.warn(
                f"ignoring profile cache {path}: it holds key {str(data.get('key'))[:16]}..., not {key[:16]}...",
                stacklevel=2,
            )
            return None
        try:
            costs = CostModel.from_dict(data["costs"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            warnings.warn(f"ignoring profile cache {path}: bad cost model ({type(e).__name__}: {e})", stacklevel=2)
            return None
        problems = costs.problems(graph)
        if problems:
            warnings.warn(f"ignoring profile cache {path}: {'; '.join(problems)}", stacklevel=2)
            return None
        return costs

    def store(self, key: str, costs: CostModel) -> Path:
        """Write ``costs`` under ``key`` atomically; return the file's path (a warning, not an error, on OSError)."""
        path = self.path(key)
        self._write(path, {"schema": CACHE_SCHEMA, "key": key, "costs": costs.to_dict()}, "profile cache")
        return path

    def _write(self, path: Path, payload: dict, what: str) -> None:
        """``payload`` as JSON at ``path``, atomically (temporary file + ``os.replace``); a warning on OSError."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(payload, sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"could not write {what} {path}: {e}", stacklevel=3)
            tmp.unlink(missing_ok=True)

    def factor_path(self, key: str) -> Path:
        return self.directory / f"calibration-{key}.json"

    def load_factor(self, key: str) -> float | None:
        """The calibration factor stored under ``key`` (how much faster or slower the compiled code of a scheduled
        graph ran than its plain code); None if absent, or (with a warning naming the file) unreadable or not a
        number in [0.05, 20]."""
        path = self.factor_path(key)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            value = float(data["factor"]) if isinstance(data, dict) and data.get("key") == key else None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"ignoring calibration {path}: {type(e).__name__}: {e}", stacklevel=2)
            return None
        if value is None or not 0.05 <= value <= 20.0:  # also rejects NaN
            warnings.warn(f"ignoring calibration {path}: factor {value!r} is not a number in [0.05, 20] for this "
                          "key", stacklevel=2)
            return None
        return value

    def store_factor(self, key: str, factor: float) -> None:
        """Write ``factor`` under ``key`` atomically (a warning, not an error, on OSError)."""
        self._write(self.factor_path(key), {"schema": CACHE_SCHEMA, "key": key, "factor": factor}, "calibration")
