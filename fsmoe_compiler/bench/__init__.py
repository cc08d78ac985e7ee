"""``fsmoe bench``: time MoE training steps of eager, aot_eager, inductor, PyTorch's overlap scheduler,
torchtitan's EP overlap and fsmoe side by side on local ranks."""
