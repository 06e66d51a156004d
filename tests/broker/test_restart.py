"""Restarts that refuse nothing (issue 13): a real server under ``run
--broker --share SAMEAPP`` restarted while a client connects every
millisecond, with and without ``serve --linger`` (soak/restart_broker.py;
the same script, shorter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import requires_linux, requires_root
from test_broker import ALICE, POLICY, BrokerProc, start_broker, users, workdir  # noqa: F401

pytestmark = [requires_root, requires_linux, pytest.mark.root]

SOAK = Path(__file__).resolve().parents[2] / "soak" / "restart_broker.py"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


def restarts(
    b: BrokerProc, n: int, program: Sequence[str] = (), linger: float | None = None
) -> dict[str, object]:
    own = ["--linger", str(linger)] if linger is not None else []
    done = subprocess.run(
        [NSENTER, f"--net=/proc/{b.pid}/ns/net", sys.executable, str(SOAK), "--socket", b.path,
         "--user", ALICE, "--restarts", str(n), *own, *(["--", *program] if program else [])],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("linger", [True, False], ids=["linger", "no-linger"])
def test_restarts_refuse_nothing_with_linger(
    start_broker: Callable[..., BrokerProc],  # noqa: F811
    linger: bool,
) -> None:
    extra = ["--linger", "5"] if linger else []
    b = start_broker(POLICY, *extra)
    r = restarts(b, 4)
    assert r["ok"] > 0 and r["other"] == 0, r
    if linger:
        assert (r["refused"], r["reset"], r["timeout"]) == (0, 0, 0), r
        events = {e["event"] for e in b.audit()}
        assert {"linger"} <= events, events
    else:  # the test can fail: without linger the gaps are refused
        assert r["refused"] > 0, r


def test_a_linger_of_its_own_capped_by_the_broker(
    start_broker: Callable[..., BrokerProc],  # noqa: F811
) -> None:
    """No default linger (``--linger 0``); the server asks for 30 s itself
    (``run --broker --linger 30``), the broker caps it at ``--max-linger 5``:
    4 restarts refuse nothing, and every lingering lasted the capped 5 s."""
    b = start_broker(POLICY, "--max-linger", "5")
    r = restarts(b, 4, linger=30)
    assert r["ok"] > 0 and r["other"] == 0, r
    assert (r["refused"], r["reset"], r["timeout"]) == (0, 0, 0), r
    lingered = b.audit("linger")
    assert lingered and {e["seconds"] for e in lingered} == {5.0}, lingered


WSGI_OK = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\\n"]
"""


@pytest.fixture(scope="module")
def gunicorn() -> Iterator[list[str]]:
    """gunicorn from PyPI in a venv of Debian's python3, world-readable."""
    d = Path(tempfile.mkdtemp(prefix="sockc-gunicorn-", dir="/tmp"))
    d.chmod(0o755)
    venv = d / "venv"
    made = subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], capture_output=True)
    pip = made.returncode == 0 and subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "gunicorn>=25.1"],
        capture_output=True, timeout=600,
    ).returncode == 0  # fmt: skip
    if not pip:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip("cannot install gunicorn (no /usr/bin/python3 venv, or no package index)")
    (d / "wsgi_ok.py").write_text(WSGI_OK)
    for root, _dirs, files in os.walk(d):
        os.chmod(root, 0o755)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)
    # --graceful-timeout: a SIGTERM that lands while a worker is still booting
    # leaves gunicorn waiting for it for the whole graceful timeout (30 s by
    # default, as long as the soak waits); seen in CI, gunicorn's own race.
    yield [str(venv / "bin" / "gunicorn"), "--no-control-socket", "--workers", "2",
           "--graceful-timeout", "5", "--chdir", str(d), "wsgi_ok:app"]  # fmt: skip
    shutil.rmtree(d, ignore_errors=True)


def test_gunicorn_restarts_refuse_nothing_with_linger(
    start_broker: Callable[..., BrokerProc],  # noqa: F811
    gunicorn: list[str],
) -> None:
    b = start_broker(POLICY, "--linger", "10")
    r = restarts(b, 3, gunicorn)
    assert r["ok"] > 0 and (r["refused"], r["reset"], r["timeout"], r["other"]) == (0, 0, 0, 0), r
