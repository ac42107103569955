"""A small TCP proxy for network faults between a worker and PostgreSQL (threads).

Modes, switchable at run time (``proxy.mode = ...`` or the methods):

- ``pass``: forward both ways;
- ``blackhole``: keep every socket open and forward nothing (a partition: TCP buffers hold the
  bytes, nothing is closed, no RST; new connections are accepted and hang the same way);
- ``reset``: close every connection with an RST (SO_LINGER 0), and reset new ones at once;
- ``delay``: forward every chunk after ``delay_ms`` milliseconds.

``hold_new = True`` holds the connections made from then on (a slow reconnect) until
``release_held()``.  ``blackhole_existing()`` cuts only the connections open now (a NAT or firewall that forgot
them: the half-open socket case) while new connections pass.  Modelled on pg-boss's
``test/halfOpenProxy.ts``.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

MODES = ("pass", "blackhole", "reset", "delay")


class _Pipe:
    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None
        self.cut = False
        self.held = proxy.hold_new
        self.closed = False
        self.thread = threading.Thread(target=self.run, name="tcpproxy-pipe", daemon=True)

    def blocked(self) -> bool:
        return self.cut or self.held or self.proxy.mode == "blackhole"

    def run(self) -> None:
        try:
            while self.blocked() and not self.proxy.closed:  # a blackholed connect hangs
                time.sleep(0.05)
            if self.proxy.mode == "reset":
                self.reset()
                return
            self.server = socket.create_connection(self.proxy.upstream, timeout=10)
            self.server.settimeout(None)
            self._pump()
        except OSError:
            pass
        finally:
            self.close()

    def _pump(self) -> None:
        assert self.server is not None
        peers = {self.client: self.server, self.server: self.client}
        while not self.closed and not self.proxy.closed:
            if self.proxy.mode == "reset":
                self.reset()
                return
            if self.blocked():
                time.sleep(0.05)  # hold the bytes where they are; nothing moves, nothing closes
                continue
            ready, _, _ = select.select(list(peers), [], [], 0.1)
            for sock in ready:
                if self.blocked():
                    break
                data = sock.recv(65536)
                if not data:
                    return
                if self.proxy.mode == "delay" and self.proxy.delay_ms > 0:
                    time.sleep(self.proxy.delay_ms / 1000.0)
                peers[sock].sendall(data)

    def reset(self) -> None:
        for sock in (self.client, self.server):
            if sock is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.server):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        with self.proxy.lock:
            if self in self.proxy.pipes:
                self.proxy.pipes.remove(self)


class TcpProxy:
    """``TcpProxy(("127.0.0.1", 5432))``; connect to ``proxy.port``."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.delay_ms = 0
        self.hold_new = False
        """New connections are accepted and held (nothing forwarded) until :meth:`release_held`."""
        self.closed = False
        self.lock = threading.Lock()
        self.pipes: list[_Pipe] = []
        self.accepted = 0
        self.listener = socket.create_server((host, 0))
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            ready, _, _ = select.select([self.listener], [], [], 0.1)
            if not ready:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            pipe = _Pipe(self, client)
            with self.lock:
                self.pipes.append(pipe)
            pipe.thread.start()

    # -- switching ---------------------------------------------------------------------------------

    def set_mode(self, mode: str, delay_ms: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.delay_ms = delay_ms
        self.mode = mode
        if mode == "reset":
            for pipe in self.connections():
                pipe.reset()

    def passthrough(self) -> None:
        self.set_mode("pass")

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def reset(self) -> None:
        """Reset the open connections, and new ones until the mode changes."""
        self.set_mode("reset")

    def delay(self, ms: int) -> None:
        self.set_mode("delay", ms)

    def blackhole_existing(self) -> int:
        """Cut the connections open now (they stay open, silent); new ones pass."""
        pipes = self.connections()
        for pipe in pipes:
            pipe.cut = True
        return len(pipes)

    def release_held(self) -> None:
        self.hold_new = False
        for pipe in self.connections():
            pipe.held = False

    def connections(self) -> list[_Pipe]:
        with self.lock:
            return [p for p in self.pipes if not p.closed]

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        for pipe in self.connections():
            pipe.close()
