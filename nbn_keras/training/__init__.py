"""Training: the run driver, its config, losses, schedules, optimizer, callbacks, metrics and run files."""
