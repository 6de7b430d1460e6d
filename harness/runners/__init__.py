"""Runners execute one stage command somewhere (a local process now; containers and
Slurm later) and report how it ended, with infra failures told apart from the
submission's own."""
