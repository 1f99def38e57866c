"""What the tests and the benchmarks both need to run the product for real: private redis-servers
and ``xpeft serve`` children (``processes``), a local Redis Cluster (``cluster``), the repository's
nginx config on loopback (``nginx``), ``xpeft worker`` children and job polling (``workers``), and
the fault scenarios that a test runs briefly and a benchmark at length (``scenarios``).

Why a top-level package beside ``bench/`` rather than ``xpeft.testing``: it is not part of what
users install (the wheel and the image hold the product packages only), so it needs no entry in
pyproject.toml's package list, no editable-install mapping and no type-marker. It is found on
``sys.path`` from the repository root: pytest adds the root (``pythonpath`` in pyproject.toml),
and ``python -m bench.<harness>`` runs from the root too.

Its import layer (tests/test_import_layers.py): it may import the product packages (``xpeft.*``)
and itself, never ``bench`` or the tests; no product package imports it. ``bench/`` keeps only
harness code and takes its processes from here; tests import it instead of ``bench/``.
"""
