"""A PostgreSQL server for the tests: $PLAINLM_PG_URL if set, else a throwaway one.

The throwaway server is Debian's `initdb` + `pg_ctl` (package `postgresql`, binaries in
/usr/lib/postgresql/<ver>/bin) on a fresh data directory under a temp dir, listening on 127.0.0.1
at a free port with `trust` auth; it is started once per test process and stopped at exit.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user (runuser),
with the temp dir handed to it.

`pg_url` is a pytest fixture. When no server can be had, tests skip with the reason; under CI
(`CI` set to anything but "" / "0" / "false") they fail instead, since CI is expected to provide one.
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

_state: dict = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_throwaway() -> str:
    """Start a server; return its URL. Raises RuntimeError with the reason when impossible."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                           "apt-get install -y postgresql, or set PLAINLM_PG_URL")
    as_user: list[str] = []
    tmp = tempfile.mkdtemp(prefix="plainlm-pg-")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no 'postgres' user to run the server as") from None
        runuser = shutil.which("runuser")
        if not runuser:
            raise RuntimeError("running as root and `runuser` is missing")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        as_user = [runuser, "-u", "postgres", "--"]
    data, log = os.path.join(tmp, "data"), os.path.join(tmp, "log")
    port = _free_port()
    r = subprocess.run(as_user + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                  "--no-sync"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"initdb failed: {r.stderr.strip()[-500:]}")
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = subprocess.run(as_user + [pg_ctl, "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start"],
                       capture_output=True, text=True)
    if r.returncode:
        tail = open(log).read()[-500:] if os.path.exists(log) else ""
        raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()[-300:]} {tail}")

    def stop():
        subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(stop)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    import psycopg
    for _ in range(50):                      # -w waits for readiness; be patient anyway
        try:
            psycopg.connect(url).close()
            break
        except psycopg.OperationalError:
            time.sleep(0.1)
    return url


def server_url() -> str:
    """$PLAINLM_PG_URL or a throwaway server (started once per process)."""
    if os.environ.get("PLAINLM_PG_URL"):
        return os.environ["PLAINLM_PG_URL"]
    if "url" not in _state:
        try:
            _state["url"] = start_throwaway()
        except Exception as e:          # noqa: BLE001 - reported as the skip/fail reason
            _state["url"] = None
            _state["err"] = str(e)
    if _state["url"] is None:
        raise RuntimeError(_state["err"])
    return _state["url"]


def fresh_database(base_url: str) -> str:
    """A new empty database on the server (so tests never see each other's rows)."""
    import psycopg
    name = f"plainlm_test_{os.getpid()}_{int(time.time() * 1e6) % 10**9}"
    with psycopg.connect(base_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    head, _, tail = base_url.rpartition("/")
    q = ""
    if "?" in tail:
        tail, q = tail.split("?", 1)
        q = "?" + q
    return f"{head}/{name}{q}"


def pg_database() -> str:
    """URL of a new empty database; skips the test (fails under CI) when no server can be had."""
    try:
        base = server_url()
    except RuntimeError as e:
        if _in_ci():
            pytest.fail(f"PostgreSQL unavailable under CI: {e}")
        pytest.skip(f"PostgreSQL unavailable: {e}")
    return fresh_database(base)


@pytest.fixture
def pg_url():
    """URL of an empty PostgreSQL database."""
    return pg_database()
