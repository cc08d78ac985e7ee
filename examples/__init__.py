"""Tiny trainable MoE models built from ``fsmoe_compiler.moe`` (importable from the repo root as ``examples.*``)."""
