"""eptrace: a kernel-level network tracer for AI-agent sandboxes."""

__version__ = "0.1.0"
