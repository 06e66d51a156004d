"""Commands import only what they use (a structural check, not a timing
one): every command but ``serve`` runs without asyncio, and ``sockcreator
creator`` execs the creator before it imports anything of the package.
Each case is a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, sys
argv = sys.argv[1:]
try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from sockcreator.cli import main
        main(argv)
except SystemExit:
    pass
HEAVY = ("asyncio", "dataclasses", "inspect", "typing", "concurrent.futures", "pathlib", "queue",
         "subprocess", "argparse", "re", "threading", "signal")
print(" ".join(sorted(m for m in sys.modules if m in HEAVY or m.startswith("sockcreator"))))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "--help"],
        ["check", "--help"],
        ["status", "--help"],
        ["status", "--socket", "/nonexistent/broker.sock"],
    ],
    ids=lambda a: " ".join(a),
)
def test_commands_other_than_serve_import_no_asyncio(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()  # fmt: skip
    assert "asyncio" not in out, out
    assert not [m for m in out if m.startswith("sockcreator.broker.") and m not in (
        "sockcreator.broker.client", "sockcreator.broker._clientlib",
        "sockcreator.broker._protocol", "sockcreator.broker.status",
        "sockcreator.broker._audit")], out  # fmt: skip


def test_serve_is_the_one_that_imports_asyncio() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, "serve", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()  # fmt: skip
    assert "asyncio" in out


def test_import_sockcreator_loads_nothing_else_until_used() -> None:
    code = ("import sys, sockcreator\n"
            "mods = [m for m in sys.modules if m.startswith('sockcreator') or m == 'asyncio']\n"
            "print(sorted(mods))\n"
            "sockcreator.SocketCreator\n"
            "print('asyncio' in sys.modules)\n"
            "sockcreator.AsyncSocketCreator\n"
            "print('asyncio' in sys.modules)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()  # fmt: skip
    assert out == ["['sockcreator']", "False", "True"]


def test_creator_execs_before_importing_the_package() -> None:
    """``-X importtime`` lists every import of the first interpreter; after
    the exec the creator (stdin is not a socket here) exits 14."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sockcreator", "creator", "--allow-all"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 14, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    ours = {m for m in imported if m.startswith("sockcreator")}
    assert ours <= {"sockcreator", "sockcreator.__main__", "sockcreator.cli"}, ours
    assert "asyncio" not in imported and "argparse" not in imported


def test_run_spells_the_broker_variable_as_the_broker_client_does() -> None:
    from sockcreator.broker.client import ENV_BROKER_FD
    from sockcreator.run.launcher import ENV_BROKER_FD as spelled

    assert spelled == ENV_BROKER_FD


def test_run_puts_the_sockets_where_activation_reads_them() -> None:
    from sockcreator.activation import SD_LISTEN_FDS_START
    from sockcreator.run.launcher import SD_LISTEN_FDS_START as spelled

    assert spelled == SD_LISTEN_FDS_START


def test_run_loads_the_broker_client_only_for_broker() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, "run", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()  # fmt: skip
    assert "sockcreator.broker.client" not in out, out


#: What ``run`` (and ``run --broker``) never needs at start-up: the frozen
#: value classes come from sockcreator._record, type aliases need no typing,
#: and subprocess, queue and concurrent.futures wait for a creator to spawn.
NOT_FOR_RUN = ("asyncio", "dataclasses", "inspect", "typing", "concurrent.futures", "pathlib",
               "queue", "subprocess")  # fmt: skip


def test_run_imports_no_dataclasses_typing_or_futures() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, "run", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()  # fmt: skip
    assert "sockcreator.run.launcher" in out, out
    assert not [m for m in (*NOT_FOR_RUN, "sockcreator.activation") if m in out], out


def test_run_broker_imports_no_dataclasses_typing_futures_or_subprocess() -> None:
    """As far as connecting (to no broker here: exit status 103).  A plain
    command line is parsed without argparse (nor re) too, and the clients'
    locks are _thread's (threading waits for a creator to spawn), and
    signal's functions are _signal's (signal.py makes enums)."""
    argv = ["run", "--broker", "/nonexistent/broker.sock", "--allow-root", "--listen",
            "tcp:127.0.0.1:80", "--", "/bin/true"]  # fmt: skip
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()  # fmt: skip
    assert "sockcreator.broker.client" in out, out
    late = ("argparse", "re", "threading", "signal")
    assert not [m for m in (*NOT_FOR_RUN, *late) if m in out], out
