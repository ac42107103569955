"""One adapter per library; the peers' modules import their library only when loaded."""

from __future__ import annotations

import importlib

from .base import System

LIBRARIES: dict[str, str] = {
    "sqla_pq": "benchmarks.adapters.sqla_pq_bench:SqlaPq",
    "procrastinate": "benchmarks.adapters.procrastinate_bench:Procrastinate",
    "pgqueuer": "benchmarks.adapters.pgqueuer_bench:PgQueuerSystem",
    "rq": "benchmarks.adapters.rq_bench:RQ",
}
PEERS = ("procrastinate", "pgqueuer", "rq")


def load(library: str) -> type[System]:
    module, _, attr = LIBRARIES[library].partition(":")
    return getattr(importlib.import_module(module), attr)
