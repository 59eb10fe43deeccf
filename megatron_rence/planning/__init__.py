"""Launch planning on CPU: parameter counts, the layout checks and the per-GPU memory model behind `rence-plan`."""
