"""The kernel side: cgroup v2 helpers and the bcc loader for probes/."""
