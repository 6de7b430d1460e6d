"""Benchmark harness for agent-submitted low-bit BitLinear modules."""

__version__ = "0.1.0"
