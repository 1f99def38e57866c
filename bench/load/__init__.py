"""The server load test: ``python -m bench.load.run``; see docs/LOAD_TEST.md."""
