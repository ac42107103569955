"""A PostgreSQL the fault tests own and may break: restart it, crash it, stop it, make it
read-only, kill its backends.  Never the machine's shared server.

Built from the binaries of the embedded ``pgserver`` package (``pginstall/bin``).  PostgreSQL
refuses to run as root; as root the server runs as the OS user ``pgserver`` (what pgserver
itself does), through ``subprocess``'s ``user=``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

# fsync=off: an immediate stop is not a power cut, the OS keeps what was written.  Commits stay
# synchronous: with synchronous_commit=off a crash would lose committed rows, jobs included.
SERVER_OPTIONS = (
    "-c fsync=off -c full_page_writes=off "
    "-c autovacuum_naptime=1 -c log_lock_waits=on -c deadlock_timeout=200ms "
    "-c max_connections=200 -c shared_buffers=64MB -c log_min_messages=warning "
    "-c log_line_prefix='%m [%p] %a ' -c listen_addresses=127.0.0.1"
)


def pg_bin_dir() -> Path | None:
    """pgserver's bundled binaries, or None when the package is not installed."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
    except Exception:  # noqa: BLE001 - no pgserver: the scenarios that need a server skip
        return None
    return Path(POSTGRES_BIN_PATH) if (Path(POSTGRES_BIN_PATH) / "pg_ctl").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_as_user() -> str | None:
    """The OS user that runs the server: ``pgserver`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return "pgserver"


def give_to(path: Path, user: str | None) -> None:
    if user is None:
        return
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


class PgCluster:
    """One PostgreSQL cluster in a temporary folder, on its own port."""

    def __init__(self, bin_dir: Path, base: Path | None = None) -> None:
        self.bin = bin_dir
        self.user = run_as_user()
        if self.user:
            from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

            ensure_prefix_permissions(bin_dir)
            ensure_folder_permissions(bin_dir, 0o555)
            ensure_folder_permissions(bin_dir.parent / "lib", 0o444)
        self.base = Path(base or tempfile.mkdtemp(prefix="sqla_pq_faults_pg_"))
        self.base.chmod(0o755)
        self.data = self.base / "data"
        self.log_path = self.base / "server.log"
        self.port = free_port()
        self.extra_options = ""

    # -- commands ------------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], user=self.user,
                              capture_output=True, text=True, timeout=timeout, check=check,
                              cwd=str(self.base))

    def init(self) -> None:
        self.data.mkdir()
        give_to(self.data, self.user)
        self.log_path.touch()
        give_to(self.log_path, self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale=C")

    def start(self, timeout: float = 60) -> None:
        options = f"-p {self.port} -k {self.data} {SERVER_OPTIONS} {self.extra_options}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w",
                  "-t", str(int(timeout)), "-o", options, "start", timeout=timeout + 10)
        self.started_at = time.monotonic()

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", str(int(timeout)), "-m", mode,
                  "stop", timeout=timeout + 10)

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: no shutdown checkpoint; crash recovery at the next start."""
        self.stop("immediate")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        result = self._run("pg_ctl", "-D", str(self.data), "status", check=False)
        return result.returncode == 0

    def ensure_running(self) -> None:
        if not self.is_running():
            self.start()

    def reload(self) -> None:
        with self.admin() as c:
            c.exec_driver_sql("SELECT pg_reload_conf()")

    # -- connections ---------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> URL:
        return URL.create("postgresql+psycopg2", username="postgres", host="127.0.0.1",
                          port=self.port, database=database)

    def admin(self) -> Any:
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT",
                                  poolclass=sa.pool.NullPool)
        return _DisposingConnection(engine)

    def terminate(self, application_name_like: str, database: str | None = None) -> int:
        """``pg_terminate_backend`` of the backends whose application_name matches."""
        sql = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
               "WHERE application_name LIKE %(p)s AND pid <> pg_backend_pid()")
        params: dict[str, Any] = {"p": application_name_like}
        if database:
            sql += " AND datname = %(d)s"
            params["d"] = database
        with self.admin() as c:
            return int(c.exec_driver_sql(sql, params).scalar() or 0)

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                f.seek(since)
                return f.read()
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def destroy(self) -> None:
        try:
            if self.is_running():
                self.stop("immediate", timeout=30)
        except Exception:  # noqa: BLE001 - best effort at the end of the session
            pass
        shutil.rmtree(self.base, ignore_errors=True)


class _DisposingConnection:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def __enter__(self) -> sa.Connection:
        self.conn = self.engine.connect()
        return self.conn

    def __exit__(self, *exc: Any) -> None:
        self.conn.close()
        self.engine.dispose()


class PgBouncer:
    """pgbouncer in front of a cluster (transaction pooling by default)."""

    def __init__(self, binary: str, cluster: PgCluster, pool_mode: str = "transaction") -> None:
        self.binary = binary
        self.cluster = cluster
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sqla_pq_faults_bouncer_"))
        self.dir.chmod(0o755)
        self.ini = self.dir / "pgbouncer.ini"
        self.log_path = self.dir / "pgbouncer.log"
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        self.ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={cluster.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir = {self.dir}\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "default_pool_size = 20\nmax_client_conn = 500\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.log_path}\n"
            "admin_users = postgres\n"
        )
        for p in self.dir.iterdir():
            give_to(p, cluster.user)
        give_to(self.dir, cluster.user)
        self.proc = subprocess.Popen([binary, str(self.ini)], user=cluster.user,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"pgbouncer did not start: {err}{self.log()}") from None
                time.sleep(0.1)

    def url(self, database: str) -> URL:
        return URL.create("postgresql+psycopg2", username="postgres", host="127.0.0.1",
                          port=self.port, database=database)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
