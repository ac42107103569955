"""A canary (S34, S39): importing it writes the file named by SQLA_PQ_FAULT_CANARY.  Tasks outside
``allowed_tasks`` must never be imported, so the file must never appear."""

import os

_path = os.environ.get("SQLA_PQ_FAULT_CANARY")
if _path:
    with open(_path, "a") as f:
        f.write(f"imported by pid {os.getpid()}\n")


def run(*args: object) -> str:
    return "the canary ran"
