"""tomodask.kernels."""
