"""The side-by-side benchmark runner: ``python benchmarks/run.py [--quick]``.

See benchmarks/README.md.  The modules here import only the standard library at the top, so
that the peer adapters can run them from the peers' own virtual environment.
"""
