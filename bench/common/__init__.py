"""What the benchmark harnesses share, so that none imports another: the measured ``xpeft serve``
child, load generation and its statistics, the machine and texts a run records, and the writing of
generated doc sections. What the tests run too (private redis-servers, ``xpeft serve`` children with
faults, a Redis Cluster, nginx, fault scenarios) is in testsupport/."""
