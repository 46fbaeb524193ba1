"""Charts and reports written next to a run's outputs."""
