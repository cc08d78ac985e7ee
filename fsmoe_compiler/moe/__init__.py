"""Reference Mixture-of-Experts layers users can build models from.

Routers (``routers``), capacity-based and dropless dispatch with expert
parallelism over ``_functional_collectives`` (``dispatch``), stacked expert
FFNs (``experts``) and the ``MoELayer`` that puts them together (``layer``).
Everything traces under ``torch.compile`` with zero graph breaks; importing
this package sets ``torch._dynamo.config.capture_scalar_outputs = True``,
which dropless dispatch needs for its data-dependent split sizes.
"""

from .dispatch import (
    DISPATCHERS,
    CapacityDispatcher,
    DroplessDispatcher,
    capacity_combine,
    capacity_dispatch,
    capacity_positions,
    enable_dropless_tracing,
)
from .experts import EXPERTS, DenseFFN, Experts, GeluExperts, SwiGLUExperts
from .layer import MoELayer
from .parallel import split_parameters, sync_gradients
from .routers import (
    ROUTERS,
    DeepSeekRouter,
    ExpertChoiceRouter,
    GShardRouter,
    MixtralRouter,
    Router,
    RouterOutput,
    SigmoidRouter,
    SoftMoERouter,
    SwitchRouter,
    XMoERouter,
    compute_capacity,
    load_balancing_loss,
    make_router,
)

__all__ = [
    "DISPATCHERS",
    "EXPERTS",
    "ROUTERS",
    "CapacityDispatcher",
    "DeepSeekRouter",
    "DenseFFN",
    "DroplessDispatcher",
    "ExpertChoiceRouter",
    "Experts",
    "GShardRouter",
    "GeluExperts",
    "MixtralRouter",
    "MoELayer",
    "Router",
    "RouterOutput",
    "SigmoidRouter",
    "SoftMoERouter",
    "SwiGLUExperts",
    "SwitchRouter",
    "XMoERouter",
    "capacity_combine",
    "capacity_dispatch",
    "capacity_positions",
    "compute_capacity",
    "enable_dropless_tracing",
    "load_balancing_loss",
    "make_router",
    "split_parameters",
    "sync_gradients",
]
