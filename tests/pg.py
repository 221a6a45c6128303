"""Test helper: a throwaway PostgreSQL cluster in a temp dir (Debian's `postgresql`: initdb + pg_ctl).

As root (CI) the server runs as the `postgres` user through `runuser -u postgres --` (PostgreSQL refuses to run
as root); otherwise as the current user. It listens on 127.0.0.1 and a private socket dir only; `stop()` shuts
it down (fast mode) and removes the directory. `unavailable()` says why it cannot run here, for a skip reason.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").exists():
            return Path(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def unavailable() -> str | None:
    """None when a cluster can be started here, else the reason (for pytest.skip)."""
    if _bindir() is None:
        return "PostgreSQL server binaries not found (Debian package `postgresql`; scripts/system-deps installs it)"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _uid("postgres") is None):
        return "running as root without a `postgres` user or runuser to start PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary,pool]')"
    return None


def _uid(name: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    def __init__(self) -> None:
        bindir = _bindir()
        assert bindir is not None, unavailable()
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="cocoon-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER") or "cocoon"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._n = 0
        self.started = False

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")

    def start(self) -> PgCluster:
        if os.geteuid() == 0:
            os.chown(self.dir, _uid("postgres") or 0, -1)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
                  "-o", opts, "-w", "-t", "60", "start")
        self.started = True
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh empty database on this cluster; returns its URL."""
        import psycopg

        self._n += 1
        name = f"t{self._n}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except RuntimeError:
                pid_file = self.data / "postmaster.pid"
                if pid_file.exists():  # the server we started, by its own pid file
                    os.kill(int(pid_file.read_text().split()[0]), 9)
                    time.sleep(0.5)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
