"""Checks a submission must pass before any budget is spent."""
