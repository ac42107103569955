"""Loaded (through PYTHONPATH) only by worker processes the fault tests run under libfaketime.

libfaketime 0.9.10 with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` makes Python's ``time.sleep``
fail with EINVAL (it sleeps with ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``), and
without that setting it fakes the monotonic clock as well and ``threading.Event.wait`` hangs.
So the fault tests keep the monotonic clock real (a real clock step never moves it either) and
sleep through ``select()``, which libfaketime leaves alone.  A tool workaround, not a product one.
"""

import os
import select
import time

if "faketime" in os.environ.get("LD_PRELOAD", ""):
    _real_sleep = time.sleep

    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([], [], [], left)

    time.sleep = _sleep
