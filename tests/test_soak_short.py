"""The soak scripts, CI-sized: the full runs' figures are in docs/reliability.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from conftest import requires_linux, requires_root

pytestmark = requires_linux

SOAK = Path(__file__).resolve().parent.parent / "soak"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SOAK / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_soak_creator_short_run_is_flat() -> None:
    out = subprocess.run(
        [sys.executable, str(SOAK / "soak_creator.py"), "--n", "4000", "--batch", "500"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("flat")
    assert "4000 sockets, 8 'E' answers" in out.stdout


@requires_root
def test_soak_broker_short_run_is_flat() -> None:
    """The broker soak (it starts a broker as root, in a fresh network
    namespace), CI-sized: grant/release cycles from several connections."""
    out = subprocess.run(
        [sys.executable, str(SOAK / "soak_broker.py"), "--cycles", "3000", "--clients", "8"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("flat")
    assert "3000 cycles from 8 clients" in out.stdout
    assert "broker exit 0, creator gone" in out.stdout


def test_soak_creator_flatness_check_can_fail() -> None:
    soak = _load("soak_creator")
    flat = [soak.Sample(i * 100, i, 0.1 * i, 9000, 3, 20000, 7) for i in range(1, 6)]
    assert soak.check_flat(flat, 512) == []
    leaky = [*flat, soak.Sample(600, 6, 0.6, 9000, 4, 20000, 7)]
    assert any("creator fds" in p for p in soak.check_flat(leaky, 512))
    client_leak = [*flat, soak.Sample(600, 6, 0.6, 9000, 3, 20000, 8)]
    assert any("client fds" in p for p in soak.check_flat(client_leak, 512))
    growing = [*flat, soak.Sample(600, 6, 0.6, 9000 + 513, 3, 20000, 7)]
    assert any("creator_rss_kib" in p for p in soak.check_flat(growing, 512))
