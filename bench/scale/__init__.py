"""One Redis holding a million profiles, and the key layout on a real Redis Cluster."""
