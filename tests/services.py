"""Real services for the scaling-out tests, started by the tests and always stopped again.

- `postgres_cluster()`: Debian's PostgreSQL server (.ci/install_postgres.sh) in a throw-away
  cluster: initdb into a temporary folder, a password user, listening on 127.0.0.1 at a free
  port only (no Unix socket outside that folder), run as the unprivileged `postgres` user when
  the tests run as root (the server refuses root). `create_database` adds a database to it.
- `MlflowServer`: `mlflow server` on 127.0.0.1 at a free port with any backend store and a
  local artifact root; `stop()` / `start()` keep the port, so a client sees an outage, not a
  move.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ui_helpers import ServerExited, _stop, free_port, wait_http_ok

PG_USER, PG_PASSWORD = "ijepa", "ijepa-test-pw"


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, else None."""
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
             if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK)]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0) if found else None


def postgres_missing() -> str | None:
    """A skip reason when the PostgreSQL server binaries are not installed, else None."""
    if postgres_bin() is None:
        return "PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb, pg_ctl) not found: run .ci/install_postgres.sh"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as an unprivileged user"
    return None


def _as_server_user(cmd: list[str]) -> list[str]:
    # postgres refuses to run as root: drop to the package's `postgres` user
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_cluster(attempts: int = 3) -> Iterator[dict]:
    """Yield {"host", "port", "user", "password", "url": callable(db) -> SQLAlchemy URL}."""
    bindir = postgres_bin()
    assert bindir is not None, postgres_missing()
    root = Path(tempfile.mkdtemp(prefix="ijepa-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    pwfile = root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    started = False
    try:
        subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
                                        "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync"]),
                       check=True, capture_output=True)
        for attempt in range(1, attempts + 1):
            port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{root}' "
                    f"-c fsync=off -c max_connections=60")
            proc = subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                                                   "-t", "60", "-o", opts, "start"]), capture_output=True, text=True)
            if proc.returncode == 0:
                started = True
                break
            if attempt == attempts:  # the free port was taken meanwhile, or a real failure
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"pg_ctl start failed: {proc.stdout}{proc.stderr}\n--- server log ---\n{tail}")

        def url(db: str) -> str:
            return f"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}/{db}"

        yield {"host": "127.0.0.1", "port": port, "user": PG_USER, "password": PG_PASSWORD, "url": url,
               "log": log, "data": data}
    finally:
        if started:
            subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                            "-t", "30", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(pg: dict, name: str) -> str:
    """CREATE DATABASE `name` on the cluster; returns its SQLAlchemy URL."""
    import psycopg2

    conn = psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], password=pg["password"],
                            dbname="postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return pg["url"](name)


class MlflowServer:
    """`mlflow server --backend-store-uri B --artifacts-destination A` on 127.0.0.1:<free port>."""

    def __init__(self, backend_store_uri: str, workdir: Path, ready_timeout: float = 90.0):
        self.backend, self.workdir, self.ready_timeout = backend_store_uri, Path(workdir), ready_timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        # no background job runner (not used here; it doubles the start-up time on 2 cores)
        env = {**os.environ, "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.starts += 1
        log_path = self.workdir / f"mlflow_server.{self.starts}.log"
        # --artifacts-destination + proxied artifacts: clients send artifacts over HTTP as well
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", (self.workdir / "artifacts").as_uri(),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_http_ok(f"{self.url}/health", self.ready_timeout, self.proc)
        except (ServerExited, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"{err}\n--- {log_path} ---\n{log_path.read_text(errors='replace')[-3000:]}") from err
        return self.url

    def stop(self, crash: bool = False) -> None:
        """SIGTERM (then SIGKILL) the server's process group; `crash`: SIGKILL at once."""
        if self.proc is not None:
            if crash:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            _stop(self.proc)  # the rest of the group, if anything outlived its leader
            self.proc = None

    def __enter__(self) -> "MlflowServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(crash=True)  # a throw-away server: no graceful wait for idle keep-alive clients


def wait_until(cond, timeout: float, what: str, interval: float = 0.1):
    """Poll `cond()` until truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
