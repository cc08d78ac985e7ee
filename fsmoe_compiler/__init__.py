"""fsmoe-compiler: a torch.compile backend for Mixture-of-Experts training.

``torch.compile(model, backend="fsmoe")`` works without importing this package
(entry point ``torch_dynamo_backends``); importing it gives the user-facing
helpers ``explain``, ``report``, ``export_trace`` and the options dataclass ``FSMoEConfig``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["FSMoEConfig", "explain", "report", "export_trace", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import fsmoe_compiler.scheduler` never drags torch in.
    if name == "FSMoEConfig":
        from fsmoe_compiler.config import FSMoEConfig

        return FSMoEConfig
    if name in ("explain", "report", "export_trace"):
        from fsmoe_compiler import introspect as _introspect

        return getattr(_introspect, name)
    raise AttributeError(f"module 'fsmoe_compiler' has no attribute {name!r}")
