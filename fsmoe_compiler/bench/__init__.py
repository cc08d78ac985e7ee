"""``fsmoe bench``: time MoE training steps of eager, aot_eager, PyTorch's overlap scheduler and fsmoe side by side on local ranks."""
