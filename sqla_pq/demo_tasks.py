"""Tasks the demo enqueues (importable, so fork children and other processes find them)."""

from __future__ import annotations

import time

from .execution.call import current_job


def greet(name: str) -> str:
    return f"Hello, {name}!"


def add(a: int, b: int) -> int:
    return a + b


def slow_square(x: int, seconds: float = 0.2) -> int:
    time.sleep(seconds)
    return x * x


def flaky(succeed_on: int = 2) -> str:
    """Fails until its ``succeed_on``-th attempt: shows retries."""
    job = current_job()
    attempt = job.attempts if job else 1
    if attempt < succeed_on:
        raise RuntimeError(f"attempt {attempt} failed on purpose")
    return f"succeeded on attempt {attempt}"


def step(name: str) -> str:
    return f"step {name} done at {time.strftime('%H:%M:%S')}"


async def fetch_like(n: int) -> int:
    """An async task: runs on the worker's event loop."""
    import asyncio

    await asyncio.sleep(0.05)
    return n * 10


def heartbeat() -> str:
    """The demo's periodic task."""
    return f"tick at {time.strftime('%H:%M:%S')}"
