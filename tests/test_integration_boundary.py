"""The framework integrations sit at the edge: the core never imports them (nor Flask, Pyramid
or zope), so an application without those frameworks installed loses nothing."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import importlib, pkgutil, sys
import sqla_pq
edge = {"sqla_pq.flask", "sqla_pq.pyramid", "sqla_pq._frameworks"}
skip = edge | {"sqla_pq.__main__"}  # that one runs the command line
for info in pkgutil.walk_packages(sqla_pq.__path__, "sqla_pq."):
    if info.name not in skip and not info.name.startswith("sqla_pq.migrations."):  # alembic scripts
        importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules
                if m in edge or m.split(".")[0] in ("flask", "pyramid", "zope", "transaction"))
print(",".join(loaded))
"""


def test_no_core_module_imports_an_integration_or_a_framework():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
