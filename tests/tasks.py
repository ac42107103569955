"""Tasks the tests enqueue.  Importable as ``tests.tasks`` by worker processes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from typing import Any

import psycopg2

from sqla_pq import Cancel, Retry, current_job


def add(a: int, b: int) -> int:
    return a + b


def echo(*args: Any, **kwargs: Any) -> Any:
    return {"args": list(args), "kwargs": kwargs}


def identity(value: Any) -> Any:
    return value


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def nothing() -> None:
    return None


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def busy_loop(seconds: float) -> None:
    """Pure-Python work: interruptible by an async exception."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def segfault() -> None:
    ctypes.string_at(0)


def hard_exit(code: int = 3) -> None:
    os._exit(code)


def allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    return len(block)


def flaky(succeed_on: int) -> int:
    job = current_job()
    assert job is not None
    if job.attempts < succeed_on:
        raise RuntimeError(f"attempt {job.attempts}")
    return job.attempts


def ask_retry(delay: str) -> None:
    raise Retry(delay)


def cancel_me() -> None:
    raise Cancel("not needed any more")


def unstorable() -> Any:
    return (x for x in range(3))  # a generator: neither JSON nor dill can store it


def _ledger_conn(url: str):  # noqa: ANN202
    from sqlalchemy.engine import make_url

    from sqla_pq.db import psycopg2_dsn

    conn = psycopg2.connect(**psycopg2_dsn(make_url(url)))
    conn.autocommit = True
    return conn


def record(url: str, tag: str = "", seconds: float = 0.0) -> int:
    """Write a ledger row (start, then finish) with the database clock; sleeps in between."""
    job = current_job()
    conn = _ledger_conn(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO test_ledger (job_id, attempt, pid, tag) VALUES (%s, %s, %s, %s) RETURNING id",
                (job.id if job else None, job.attempts if job else None, os.getpid(), tag),
            )
            row_id = cur.fetchone()[0]
            if seconds:
                time.sleep(seconds)
            cur.execute("UPDATE test_ledger SET finished_at = clock_timestamp() WHERE id = %s", (row_id,))
        return row_id
    finally:
        conn.close()


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0.01)
    return a + b


async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def async_note_cancel(path: str, seconds: float) -> float:
    """Sleep; write ``cancelled`` to ``path`` if cancelled meanwhile."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        with open(path, "w") as f:
            f.write("cancelled")
        raise
    return seconds


class Calculator:
    def __init__(self, denominator: float) -> None:
        self.denominator = denominator

    def calculate(self, x: float, y: float) -> float:
        return x * y / self.denominator


calculator = Calculator(2)


def pid() -> int:
    return os.getpid()


def returns_model(name: str) -> Any:
    from tests.models_pydantic import Person

    return Person(name=name, age=3)


def greet_person(person: Any) -> str:
    return f"{type(person).__name__}:{person.name}:{person.age}"


def sigkill_self() -> None:
    """What the kernel's OOM killer does to a process."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def append_line(path: str) -> int:
    """A cheap execution ledger: one line per execution, appended atomically."""
    job = current_job()
    line = f"{job.id if job else 0} {job.attempts if job else 0} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return job.id if job else 0


def write_pid(path: str) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


# -- multi-step jobs (django-db-queue) ----------------------------------------------------------------

created: list[int] = []


def step_one(job: Any) -> None:
    job.workspace["message"] = "Hello, task 2!"
    job.workspace["pids"] = [os.getpid()]


def step_two(job: Any) -> str:
    job.workspace["seen"] = job.workspace["message"]
    job.workspace["pids"].append(os.getpid())
    return job.workspace["message"].upper()


def tick(job: Any) -> None:
    time.sleep(0.02)
    job.workspace["ticks"] = job.workspace.get("ticks", 0) + 1


def step_fails(job: Any) -> None:
    raise RuntimeError(f"step failed with workspace {sorted(job.workspace)}")


def on_failure(job: Any, exc: BaseException) -> None:
    with open(job.workspace["hook_file"], "a") as f:
        f.write(f"{job.id} {type(exc).__name__} {exc}\n")


def on_create(job: Any) -> None:
    created.append(job.id)


def process_facts() -> dict[str, Any]:
    """Where the job ran: its pid, its parent's, whether SQLAlchemy is loaded there, the state
    of its garbage collector (on? how many objects frozen out of its reach?), and which of two
    modules sqla_pq needs only in rare cases are loaded (this module's own imports, asyncio's
    subprocess among them, are the application's business)."""
    import gc
    import sys

    return {"pid": os.getpid(), "ppid": os.getppid(), "sqlalchemy": "sqlalchemy" in sys.modules,
            "gc_enabled": gc.isenabled(), "gc_frozen": gc.get_freeze_count(),
            "loaded": sorted(m for m in ("hashlib", "ctypes.util") if m in sys.modules),
            "warmed_up": getattr(sys.modules.get("sqla_pq.execution.forkserver"), "warmed_up", 0)}


def parent_pid_then_sleep(path: str, seconds: float) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(str(os.getppid()))
    time.sleep(seconds)


def random_and_thread() -> dict[str, Any]:
    """A random number, and whether a thread started here ran (the process is usable)."""
    import random
    import threading

    ran: list[int] = []
    thread = threading.Thread(target=lambda: ran.append(threading.get_ident()))
    thread.start()
    thread.join(5)
    return {"random": random.random(), "thread_ran": bool(ran)}


def step_segfaults(job: Any) -> None:
    """A multi-step job's step whose process dies (its failure hook runs in the worker)."""
    ctypes.string_at(0)


def registered_later() -> None:
    """Registered as a task by test_call_plans only after its first, plain, enqueue."""
