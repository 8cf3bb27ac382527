"""tomodask.simulate."""
