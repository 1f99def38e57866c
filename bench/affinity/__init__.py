"""Profile-affinity routing measured with the repository's nginx config in front of real replicas."""
