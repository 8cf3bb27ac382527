"""tomodask.session."""
