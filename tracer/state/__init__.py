"""What the tracer knows between records: episodes, processes and flows."""
