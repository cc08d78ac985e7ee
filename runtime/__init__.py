"""Runtime helpers: process-group topology, control-plane exchanges, streams, execution. Never imports passes or the scheduler."""
