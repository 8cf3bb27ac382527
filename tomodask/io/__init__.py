"""tomodask.io."""
