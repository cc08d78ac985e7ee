"""Streams: which stream a node runs on, and why no explicit stream ops are inserted.

``passes.annotate`` tags every scheduled node with ``meta["fsmoe"]["stream"]``:
``"comm"`` for a functional collective and its ``wait_tensor``, ``"compute"`` for
everything else. Nothing else is needed for communication/computation overlap:

* CUDA / NCCL (reasoning only; UNTESTED here, no GPU in this project's CI):
  ``_c10d_functional.*`` collectives are enqueued by ProcessGroupNCCL on the
  communicator's own internal stream, after an event that makes it wait for the
  current (compute) stream, so the inputs are ready. ``wait_tensor`` makes the
  current stream wait on the collective's end event (it does not block the host).
  So issuing a collective early and placing its ``wait_tensor`` late in a single
  stream program IS the overlap: compute kernels enqueued between the two run
  concurrently with the transfer. ProcessGroupNCCL keeps the collective's
  tensors alive for the allocator until the wait (it stashes them on the work
  object, or ``record_stream``s them), so no ``sync_dealloc`` is needed either.
* CPU / gloo: the collective runs asynchronously on gloo's worker thread and
  ``wait_tensor`` blocks the calling thread until it is done; the deferred wait
  is again the overlap.

PyTorch's compiled-stream ops (``torch.ops.streams.fork/join/record_event/
wait_event/wait_stream/sync_dealloc/record_stream/...``) exist in torch 2.13, but
only once ``torch._dynamo.variables.streams`` is imported (Dynamo imports it), and
they take integer *indices* into Dynamo's per-graph registry of stream and event
objects (``torch._dynamo.graph_bytecode_inputs``), filled while Dynamo traces user
code that creates ``torch.cuda.Stream``/``Event`` objects. A post-aot_autograd pass
has no such registry entries to refer to, so they do not fit here;
:func:`compiled_stream_ops` reports which exist. Should a second *compute* stream
ever be wanted (e.g. dW on a side stream), :func:`side_stream` is the minimal
explicit API to build on (UNTESTED on CUDA).

This module never imports ``passes`` or ``scheduler`` (runtime rule).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.fx as fx

from fsmoe_compiler.names import COMM_STREAM, COMPUTE_STREAM, STREAMS
from fsmoe_compiler.ops import is_communication

STREAM_OPS = ("fork", "join", "record_event", "wait_event", "wait_stream", "synchronize_event",
              "synchronize_stream", "synchronize_device", "sync_dealloc", "record_stream")


def stream_of(node: fx.Node) -> str:
    """The stream ``node`` runs on: its ``meta["fsmoe"]["stream"]`` if annotated, else
    ``"comm"`` for communication ops (and waits) and ``"compute"`` for the rest."""
    meta = node.meta.get("fsmoe")
    if isinstance(meta, dict) and meta.get("stream") in STREAMS:
        return meta["stream"]
    return COMM_STREAM if is_communication(node) else COMPUTE_STREAM


def device_supports_streams(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` (default: the current accelerator) runs kernels on asynchronous streams.

    False on CPU; True for an available CUDA device (UNTESTED here: no GPU in CI).
    """
    if device is None:
        return torch.cuda.is_available()
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available()


def compiled_stream_ops() -> dict[str, bool]:
    """Which ``torch.ops.streams.*`` ops this torch has (they register when Dynamo's stream support is imported)."""
    try:
        import torch._dynamo.variables.streams  # noqa: F401 - registers the ops
    except Exception:  # noqa: BLE001 - an older or trimmed torch
        pass
    ns = torch.ops.streams
    out = {}
    for name in STREAM_OPS:
        try:
            getattr(ns, name)
            out[name] = True
        except (AttributeError, RuntimeError):
            out[name] = False
    return out


@contextlib.contextmanager
def side_stream(stream: "torch.cuda.Stream | None" = None) -> Iterator[object | None]:
    """Run the block on a side CUDA stream that first waits for the current one; the current stream waits for
    it afterwards. A no-op (yields None) where streams are not supported. UNTESTED on CUDA."""
    if not device_supports_streams():
        yield None
        return
    main = torch.cuda.current_stream()
    side = stream if stream is not None else torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield side
    main.wait_stream(side)
