"""The shape every maintenance loop shares, written once.

A service has a name, an interval, and ``run_once(link) -> dict`` that does one pass and returns
counts (tests call it directly).  The loop here runs the services of one worker in a thread on
their own connection, each pass inside a transaction that first takes
``pg_try_advisory_xact_lock(service key)``: however many workers run, one of them does a given
pass at a time, and a lock can never outlive its transaction.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

from .. import queries
from ..db import is_connection_error
from ..link import Link

log = logging.getLogger("sqla_pq.maintenance")


class Service:
    name: str = "service"
    interval: float = 60.0
    exclusive: bool = True
    """Run under the service's advisory lock (one worker at a time)."""

    @property
    def lock_key(self) -> int:
        return 0x5A1A_0000_0000 + zlib.crc32(f"sqla_pq:{self.name}".encode())

    def run_once(self, link: Link) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def run_locked(self, link: Link) -> dict[str, Any] | None:
        """One pass if this worker gets the lock; None if another worker holds it."""
        if not self.exclusive:
            return self.run_once(link)
        with link.transaction():
            got = link.run(queries.maintenance_try_lock(), {"key": self.lock_key})[0][0]
            if not got:
                return None
            return self.run_once(link)


class Maintainer(threading.Thread):
    """Runs services when they are due, until stopped."""

    def __init__(self, link: Link, services: Sequence[Service]) -> None:
        super().__init__(name="sqla_pq-maintenance", daemon=True)
        self.link = link
        self.services = list(services)
        self._stop_event = threading.Event()
        now = time.monotonic()
        # A jittered first run spreads the workers started together.
        self._due = {s.name: now + random.uniform(0.0, min(s.interval, 1.0)) for s in self.services}
        self.last_results: dict[str, dict[str, Any]] = {}
        self._failures = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            now = time.monotonic()
            for service in self.services:
                if self._stop_event.is_set():
                    break
                if self._due[service.name] > now:
                    continue
                self._pass(service)
                self._due[service.name] = time.monotonic() + service.interval
            next_due = min(self._due.values(), default=time.monotonic() + 1.0)
            self._stop_event.wait(max(0.01, min(next_due - time.monotonic(), 1.0)))
        self.link.close()

    def _pass(self, service: Service) -> None:
        try:
            result = service.run_locked(self.link)
            self._failures = 0
        except Exception as exc:
            self.link.reset()
            self._failures += 1
            if is_connection_error(exc) or _dbapi_gone(exc):
                log.warning("%s: database unavailable (%s); will retry", service.name, exc.__class__.__name__)
            else:
                log.exception("%s failed", service.name)
            time.sleep(min(0.1 * 2 ** self._failures, 5.0))
            return
        if result:
            self.last_results[service.name] = result
            if any(v for v in result.values() if isinstance(v, int)):
                log.info("%s: %s", service.name, ", ".join(f"{k}={v}" for k, v in result.items()))


def _dbapi_gone(exc: BaseException) -> bool:
    from ..db import is_dbapi_connection_error

    return is_dbapi_connection_error(exc)
