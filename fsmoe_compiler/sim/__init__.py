"""fsmoe_compiler.sim: the scheduler replayed on layer grids under cluster cost models.

Modules (torch-free except ``presets.measure_local``, which imports torch lazily):

* ``presets``  - ``get_preset(name, gpus) -> ClusterCosts`` for ``fsmoe-testbed``
  (FSMoE's measured constants), ``h100-ib400`` (derived from published
  bandwidths and bf16 throughput) and ``local`` (fitted on this machine, cached).
* ``grid``     - ``fsmoe_grid()``: FSMoE's 1458 MoE layers; ``parse_config`` for
  ``--config B=4,L=512,...``.
* ``simulate`` - ``simulate_point`` / ``simulate_grid``: every method's step
  time (ours, sequential, tutel, fsmoe_paper, lower_bound) for models made of
  stacks of a layer.
* ``summary``  - ``PointResult``, ``summarize`` -> ``PresetSummary`` (speedups,
  ceilings, gap to the lower bound, solver time, proved optimality).
* ``cli``      - ``fsmoe simulate`` (``add_simulate_parser``; also
  ``python -m fsmoe_compiler.sim.cli``).
"""
