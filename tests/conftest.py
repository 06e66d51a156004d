"""Shared test helpers: real processes, real namespaces, real users."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sockcreator._channel import CREATOR_PATH

IS_ROOT = os.geteuid() == 0
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
IP = shutil.which("ip") or "/usr/sbin/ip"

requires_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CI runs as root)")
requires_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux-only (/proc, namespaces, hardening)"
)


def fd_count(pid: int | None = None) -> int:
    """Open descriptors of ``pid`` (default: this process), from /proc."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def creator_argv(*creator_args: str) -> list[str]:
    """argv that runs our creator the safe way (python -I -S -B)."""
    return [sys.executable, "-I", "-S", "-B", CREATOR_PATH, *creator_args]


def netns_argv(argv: list[str]) -> list[str]:
    """Run ``argv`` in a fresh network namespace whose loopback is up.

    The sockets such a creator binds live in that namespace, so ports 53 and
    80 are free there; a client socket from the same creator can reach them."""
    script = f'{IP} link set lo up && exec "$0" "$@"'
    return [UNSHARE, "-n", "/bin/sh", "-c", script, *argv]


def unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except OSError:
        return 1024


TEST_USERS = ("sockc-alice", "sockc-bob", "sockc-carol")


def ensure_user(name: str) -> pwd.struct_passwd:
    """A real unprivileged user (created if missing; root only)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if not IS_ROOT:
        pytest.skip(f"user {name} missing and not root to create it")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


@pytest.fixture
def test_user() -> pwd.struct_passwd:
    return ensure_user(TEST_USERS[0])


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Assert this process's descriptor count is the same after the test."""
    before = fd_count()
    yield
    assert fd_count() == before, "descriptor leak in the test process"
