"""Restarts that refuse nothing (issue 13): a real server under ``run
--broker --share SAMEAPP`` restarted while a client connects every
millisecond, with and without ``serve --linger`` (soak/restart_broker.py;
the same script, shorter)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import requires_linux, requires_root
from test_broker import ALICE, POLICY, BrokerProc, start_broker, users, workdir  # noqa: F401

pytestmark = [requires_root, requires_linux, pytest.mark.root]

SOAK = Path(__file__).resolve().parents[2] / "soak" / "restart_broker.py"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


def restarts(b: BrokerProc, n: int) -> dict[str, object]:
    done = subprocess.run(
        [NSENTER, f"--net=/proc/{b.pid}/ns/net", sys.executable, str(SOAK), "--socket", b.path,
         "--user", ALICE, "--restarts", str(n)],
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
