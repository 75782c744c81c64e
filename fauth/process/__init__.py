"""Processes: twistd plugin options, the service tree, signals, worker processes, the demo services."""
