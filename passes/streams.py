"""Streams: what each node of a scheduled graph runs on, and a recorder that checks the plan is safe.

``passes.annotate`` tags every scheduled node with ``meta["fsmoe"]["stream"]``:
``"comm"`` for a functional collective and its ``wait_tensor``, ``"compute"``
for everything else. The plan those tags stand for:

* **compute**: every compute node on the current stream, in graph order. The
  scheduler has one compute resource, so it never places compute beside
  compute; no side stream is needed, and none is made.
* **comm**: a functional collective is enqueued where the graph issues it on
  its communication library's own stream (ProcessGroupNCCL's internal stream
  on CUDA, after an event on the compute stream, so its inputs are complete;
  gloo's worker thread on CPU), and its ``wait_tensor`` is the event the
  compute stream waits for (it does not block the host on CUDA; it blocks the
  calling thread on gloo). Issuing early and waiting late in one program is
  the overlap. The library keeps the tensors a collective reads and writes
  alive until it completes (the work object holds them), and Inductor's code
  keeps them out of buffer reuse until the wait (its collective kernels read
  their input again at the wait and treat the wait as a write of the output).

:class:`StreamRecorder` replays a graph as that two-stream program and raises
:class:`StreamHazard` where a cross-stream use has no event before it: a
compute node reads a collective's result before its wait, or writes (in place)
a buffer a collective is still reading or writing, or a collective is never
waited for before the graph returns. ``passes.verify`` runs it on every
reordered graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fsmoe_compiler.names import COMM_STREAM, COMPUTE_STREAM, STREAMS
from fsmoe_compiler.ops import is_collective, is_communication, is_wait


#: Ops that read a tensor's metadata only (a dropless layer reads the size of what an exchange will return).
METADATA_OPS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default,
                          torch.ops.aten.sym_storage_offset.default, torch.ops.aten.size.default,
                          torch.ops.aten.stride.default, torch.ops.aten.numel.default})


class StreamHazard(RuntimeError):
    """A use across streams without the event that orders it."""


def stream_of(node: fx.Node) -> str:
    """The stream ``node`` runs on: its ``meta["fsmoe"]["stream"]`` if annotated, else
    ``"comm"`` for communication ops (and waits) and ``"compute"`` for the rest."""
    meta = node.meta.get("fsmoe")
    if isinstance(meta, dict) and meta.get("stream") in STREAMS:
        return meta["stream"]
    return COMM_STREAM if is_communication(node) else COMPUTE_STREAM


def written_args(node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` writes in place (its schema's mutable arguments)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        out.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, fx.Node))
    return out


@dataclass
class StreamRecorder:
    """Replays a graph in order as the two-stream plan; ``events`` lists what it recorded, in order:
    ``("issue", collective)`` when the comm stream takes a collective after the compute stream's event, and
    ``("wait", collective)`` when the compute stream waits for the collective's completion event."""

    in_flight: dict[fx.Node, fx.Node] = field(default_factory=dict)  # collective -> the buffer it reads
    events: list[tuple[str, str]] = field(default_factory=list)

    def run(self, gm: fx.GraphModule) -> "StreamRecorder":
        for n in gm.graph.nodes:
            if n.op == "output":
                if self.in_flight:
                    left = ", ".join(c.name for c in self.in_flight)
                    raise StreamHazard(f"collective(s) {left} still in flight when the graph returns: no wait_tensor "
                                       "gives the compute stream their completion event")
                continue
            if n.op != "call_function":
                continue
            if is_collective(n):  # it reads its inputs after the compute stream's event: always ordered
                self.in_flight[n] = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
                self.events.append(("issue", n.name))
            elif is_wait(n):
                src = n.args[0]
                if src in self.in_flight:
                    del self.in_flight[src]
                    self.events.append(("wait", src.name))
            else:
                self._compute_reads(n)
                for buf in written_args(n):
                    for coll, read in self.in_flight.items():
                        if buf is read or buf is coll:
                            raise StreamHazard(f"{n.name} (compute stream) writes {buf.name} while collective "
                                               f"{coll.name} (comm stream) still uses it: its wait_tensor must "
                                               "come first")
        return self

    def _compute_reads(self, n: fx.Node) -> None:
        if n.target in METADATA_OPS:  # sizes and strides are known at issue; no data is read
            return
        for a in n.all_input_nodes:
            if a in self.in_flight:
                raise StreamHazard(f"{n.name} (compute stream) reads the result of collective {a.name} before "
                                   "its wait_tensor: no event orders the use after the transfer")


def check_streams(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Replay ``gm`` with a :class:`StreamRecorder`; its events, or :class:`StreamHazard`."""
    return StreamRecorder().run(gm).events
