"""What the benchmark harnesses share, so that none imports another: processes (private Redis
servers, ``xpeft serve`` children), load generation and its statistics, the machine and texts a
run records, and the writing of generated doc sections."""
