"""The peers' virtual environment and their subprocesses.

The peers are installed with pip into ``benchmarks/.venv-peers`` (never into the repository's
environment); each of their scenarios runs in a subprocess of that environment's python
(``python -m benchmarks.peer_main``), which prints one ``@@RESULT {json}`` line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import RESULT_PREFIX, ROOT, Sizes, worker_env

VENV = ROOT / "benchmarks" / ".venv-peers"
PACKAGES = ["procrastinate", "pgqueuer", "rq", "redis", "psycopg[binary]", "asyncpg", "psutil"]
IMPORTS = {
    "procrastinate": ["procrastinate", "psycopg"],
    "pgqueuer": ["pgqueuer", "asyncpg"],
    "rq": ["rq", "redis"],
}


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _importable(python: Path, modules: list[str]) -> str | None:
    """None when every module imports, else the error's last line."""
    done = subprocess.run([str(python), "-c", "import " + ", ".join(modules)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def ensure_venv(peers: list[str], venv: Path = VENV, install: bool = True,
                log: Any = sys.stderr) -> tuple[Path | None, dict[str, str]]:
    """The peers' python, and {peer: why it cannot run} for those that cannot."""
    python = _python(venv)
    missing = {p: _importable(python, IMPORTS[p]) for p in peers} if python.exists() else {
        p: "not installed" for p in peers}
    missing = {p: why for p, why in missing.items() if why}
    if missing and install:
        print(f"installing {', '.join(missing)} into {venv} ...", file=log, flush=True)
        try:
            if not python.exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                               capture_output=True, text=True, timeout=300)
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES],
                                  capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:  # one package at a time: one failure skips one peer
                for package in PACKAGES:
                    subprocess.run([str(python), "-m", "pip", "install", "-q", package],
                                   capture_output=True, text=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            return None, {p: f"could not create {venv}: {exc}" for p in peers}
        missing = {p: _importable(python, IMPORTS[p]) for p in peers}
        missing = {p: why for p, why in missing.items() if why}
    return (python if python.exists() else None), missing


class Peer:
    """One peer variant, driven through ``benchmarks.peer_main`` subprocesses."""

    def __init__(self, python: Path, library: str, variant: str, target: str, sizes: Sizes) -> None:
        self.python = python
        self.library = library
        self.variant = variant
        self.target = target
        self.sizes = sizes

    def _call(self, action: str, timeout: float, scenario: str | None = None) -> dict[str, Any]:
        cmd = [str(self.python), "-m", "benchmarks.peer_main", action, "--library", self.library,
               "--variant", self.variant, "--target", self.target, "--sizes", self.sizes.to_json()]
        if scenario:
            cmd += ["--scenario", scenario]
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return {"error": f"{action} {scenario or ''} timed out after {timeout:.0f}s",
                    "detail": str(exc.stderr or "")[-2000:]}
        for line in done.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        return {"error": f"{action} exited with {done.returncode} without a result",
                "detail": (done.stdout + done.stderr)[-2000:]}

    def install(self) -> dict[str, Any]:
        return self._call("install", 300)

    def describe(self) -> dict[str, Any]:
        return self._call("describe", 120)

    def run(self, scenario: str) -> dict[str, Any]:
        s = self.sizes
        biggest = max(s.enqueue, s.drain, s.memory_jobs if scenario == "M" else 0)
        return self._call("run", 300 + s.drain_timeout(biggest), scenario)

    def reset(self) -> dict[str, Any]:
        return self._call("reset", 120)
