"""make bench: what eptrace costs a sandbox, measured in one run."""
