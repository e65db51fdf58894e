"""A throwaway PostgreSQL from Debian's `postgresql` package for the tests: its own data folder, listening on a
unix socket only (no TCP port at all), stopped and removed after. As root the server runs as the `postgres`
user (PostgreSQL refuses root), so its folder is made under /tmp, not under pytest's root-only tmp_path."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (e.g. /usr/lib/postgresql/15/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_server_user(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120, **kw)


@contextlib.contextmanager
def postgres_server(database: str = "dagster", user: str = "dagster") -> Iterator[str]:
    """A running server with `database` owned by `user`; yields its SQLAlchemy URL (psycopg2, unix socket)."""
    bindir = postgres_bin()
    assert bindir is not None, "PostgreSQL is not installed: `make postgres` installs Debian's postgresql package"
    base = Path(tempfile.mkdtemp(prefix="synth-cpt-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    started = False
    try:
        done = _as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        assert done.returncode == 0, done.stderr[-2000:]
        options = f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=200"
        done = _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-o", options, "-w", "start"])
        assert done.returncode == 0, done.stderr[-2000:] + (base / "server.log").read_text()[-2000:]
        started = True
        for sql in (f"CREATE ROLE {user} LOGIN", f"CREATE DATABASE {database} OWNER {user}"):
            done = _as_server_user([str(bindir / "psql"), "-h", str(sock), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql])
            assert done.returncode == 0, done.stderr[-2000:]
        yield f"postgresql+psycopg2://{user}@/{database}?host={sock}"
    finally:
        if started:
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)
