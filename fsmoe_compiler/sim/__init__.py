"""fsmoe_compiler.sim: the simulator: a layer model of MoE training steps, planned by every method on layer grids.

Pure: imports ``fsmoe_compiler.scheduler`` (the solver core), ``fsmoe_compiler.names``
and the standard library (``tabulate`` in the CLI), never torch. The ``local``
cost preset is measured outside (``fsmoe_compiler.bench.links``) and handed in.

The layer model
    * ``costs``      - ``LayerSpec`` (one MoE block's shape as FSMoE parameterises
      it), ``ClusterCosts`` (a ``LinearCost`` per collective kind, named as in
      ``fsmoe_compiler.names``, and per GEMM), ``FFN_GEMMS``.
    * ``builders``   - ``LayerSpec`` + ``ClusterCosts`` -> ``TaskGraph``:
      ``build_layer_forward``, ``build_layer_backward``, ``build_stack_forward``,
      ``build_stack_backward``, ``build_step``; chunk i of an MoE layer is
      ``A2A_dispatch_i -> AG_i -> Expert_i -> RS_i -> A2A_combine_i``; ids like
      ``F0.a2a_d1``, ``B1.exp0``, ``B1.ar2``, ``loss``, ``B.bucket``.
    * ``layercache`` - memoised one-layer graphs, heuristic schedules and bounds.

Methods on a layer stack
    * ``methods``    - the one tuple :data:`METHODS` (``fsmoe`` = ours,
      ``sequential``, ``tutel``, ``fsmoe_paper``, ``lower_bound``), its
      :data:`ALIASES` (``cpsat``, ``ours``, ``deepspeed``) and the name reports
      print for ours (:data:`OURS`).
    * ``baselines``  - ``sequential`` and ``tutel`` (the schedules
      ``fsmoe_compiler.names`` defines, on the layer model), ``fsmoe_paper``,
      ``step_lower_bound``.
    * ``search``     - ours: per-layer degrees, joint backward search over
      degrees and gradient slices, CP-SAT (``fsmoe_step``, ``SearchOptions``,
      ``SolveCache`` / ``CACHE``: identical layers are solved once).
    * ``step``       - ``StepSchedule``: one method's plan of a step
      (``makespan`` ms, ``forward_ms``, ``backward_ms``, ``r_fwd`` / ``r_bwd``,
      ``grad_partitions``, ``status``; lazily built ``graph`` and ``schedule``,
      None for ``lower_bound``). ``status`` ``OPTIMAL`` means every piece was
      proved optimal *for the chosen degrees and slices*.
    * ``evaluate``   - ``schedule_step(specs, costs, method="fsmoe", ...)``: one
      method; ``evaluate_layer(spec, costs, methods=METHODS, num_layers=2, ...)``:
      every method on a stack of copies of one layer (baselines computed once,
      they also seed ours).

Grids and the command
    * ``presets``    - ``get_preset(name, gpus) -> ClusterCosts``: ``fsmoe-testbed``
      (FSMoE's measured constants), ``h100-ib400`` (derived from published
      bandwidths and bf16 throughput) and ``local`` (fitted from this machine's
      cached measurements).
    * ``grid``       - ``fsmoe_grid()``: FSMoE's 1458 MoE layers; ``parse_config``
      for ``--config B=4,L=512,...``.
    * ``simulate``   - ``simulate_point`` / ``simulate_grid``: every method's step
      time for models made of stacks of a layer.
    * ``summary``    - ``PointResult``, ``summarize`` -> ``PresetSummary``
      (speedups, ceilings, gap to the lower bound, solver time, proved
      optimality).
    * ``cli``        - ``fsmoe simulate`` (``add_simulate_parser``; also
      ``python -m fsmoe_compiler.sim.cli``).

The names below are the layer model's and the methods' API, as the scheduler
exported them before it became the solver core alone.
"""

from fsmoe_compiler.sim.baselines import (fsmoe_paper, paper_degree, paper_T, sequential, step_lower_bound, tutel,
                                          tutel_degree)
from fsmoe_compiler.sim.builders import (attention_cost, build_layer_backward, build_layer_forward,
                                         build_stack_backward, build_stack_forward, build_step, chunk_costs,
                                         equal_partitions)
from fsmoe_compiler.sim.costs import FFN_GEMMS, ClusterCosts, LayerSpec
from fsmoe_compiler.sim.evaluate import DEFAULT_NUM_LAYERS, evaluate_layer, schedule_step
from fsmoe_compiler.sim.methods import ALIASES, BASELINES, METHODS, OURS, REPORTED_METHODS
from fsmoe_compiler.sim.search import CACHE, SearchOptions, SolveCache, best_backward, best_forward, fsmoe_step
from fsmoe_compiler.sim.step import StepSchedule

__all__ = [
    "ClusterCosts", "LayerSpec", "FFN_GEMMS",
    "build_layer_forward", "build_layer_backward", "build_stack_forward", "build_stack_backward", "build_step",
    "chunk_costs", "attention_cost", "equal_partitions",
    "StepSchedule", "schedule_step", "evaluate_layer", "DEFAULT_NUM_LAYERS",
    "METHODS", "ALIASES", "BASELINES", "OURS", "REPORTED_METHODS",
    "sequential", "tutel", "fsmoe_paper", "step_lower_bound", "paper_T", "paper_degree", "tutel_degree",
    "fsmoe_step", "best_forward", "best_backward", "SearchOptions", "SolveCache", "CACHE",
]
