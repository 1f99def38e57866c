"""Fault scenarios against real ``xpeft serve`` processes (a store outage, overload, a SIGTERM
drain, concurrent updates, hostile clients, malformed uploads, a Redis Cluster failover): each
returns what it saw. The tests run them briefly and assert; ``python -m bench.reliability.run`` and
``python -m bench.scale.run --cluster`` run them at length and report.
"""
