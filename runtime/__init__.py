"""Runtime helpers: process-group topology, launching local ranks, execution. Never imports passes or the scheduler."""
