"""The server load test (issue 5, "Server load test"): ``python -m bench.load.run``; see docs/LOAD_TEST.md."""
