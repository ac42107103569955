"""Entry point of a peer's subprocess, run with the peers' environment's python:

    python -m benchmarks.peer_main install|describe|run|reset --library L --variant V
        --target T --sizes JSON [--scenario S]

It prints one line, ``@@RESULT {json}``, which the runner reads: ``install`` creates the
library's schema (or checks Redis), ``describe`` gives the row's label, settings, versions and
scenarios, ``run`` one scenario's figures (or its error), ``reset`` removes the jobs left.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from typing import Any

from .adapters import load
from .common import RESULT_PREFIX, Sizes


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.peer_main")
    parser.add_argument("action", choices=["install", "describe", "run", "reset"])
    parser.add_argument("--library", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--target", required=True, help="database DSN or Redis URL")
    parser.add_argument("--sizes", required=True, help="Sizes as JSON")
    parser.add_argument("--scenario")
    args = parser.parse_args(argv)
    try:
        system = load(args.library)(args.target, Sizes.from_json(args.sizes), args.variant)
    except Exception as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}", "detail": traceback.format_exc(limit=4)})
        return 1
    try:
        if args.action == "install":
            getattr(system, "install", lambda: None)()
            _emit({"ok": True})
        elif args.action == "describe":
            versions = {**system.versions(), "Python (peers)": platform.python_version()}
            _emit({"label": system.label, "settings": system.settings(), "versions": versions,
                   "scenarios": list(system.variants[args.variant])})
        elif args.action == "reset":
            system.reset()
            _emit({"ok": True})
        else:
            from .scenarios import run_scenario

            _emit(run_scenario(system, args.scenario))
    except Exception as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}", "detail": traceback.format_exc(limit=4)})
        return 1
    finally:
        system.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
