"""Tiny trainable MoE models built from ``fsmoe_compiler.moe``; the folder `examples/` installs as ``fsmoe_compiler.examples``."""
