"""Bind interception (``sockcreator run --intercept``), measured side by side.

Run as root: ``python benchmarks/bench_intercept.py [--binds N] [--rounds R]``.
Everything runs in a fresh network namespace, as ``nobody``, with Debian's
python3 as the workload (a loop of socket(), bind(), close(), timed inside
the program so start-up is not counted).  Rounds alternate between the
setups; each figure is the median of R rounds.

- privileged binds (TCP 127.0.0.1:80): through interception, against
  ``authbind --deep`` (Debian's: an LD_PRELOAD that forks a setuid helper for
  every bind).  Target: interception at most 0.25x authbind's cost.
- the same privileged binds with ``run --broker PATH --intercept`` as
  ``nobody`` (no root in the chain): each one a round trip to the broker
  (``sockcreator serve``, in the same namespace) and its creator.
- unprivileged binds (UDP 127.0.0.1:0, the CONTINUE path): no filter at all;
  a floor supervisor that answers CONTINUE to everything without looking;
  ours.  Target: ours at most 1.3x the floor.
- start-up: ``run --intercept -- /bin/true`` against ``run -- /bin/true``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = "/usr/bin/python3"
WORKLOAD = """
import socket, sys, time
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
port, n = int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
for _ in range(n):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.close()
print((time.perf_counter() - t0) / n * 1e6)
"""
REPO = Path(__file__).resolve().parent.parent


def floor_supervisor(argv: list[str]) -> str:
    """A supervisor that answers CONTINUE to every bind, reading nothing:
    the least a Python supervisor can do.  Runs the workload as nobody."""
    sys.path.insert(0, str(REPO / "src"))
    from sockcreator.run.intercept import _seccomp

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        a.close()
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        _seccomp.no_new_privs()
        listener = _seccomp.install_filter()
        b.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("@i", listener))])
        os.close(listener)
        os.dup2(w, 1)
        os.execv(argv[0], argv)
    b.close()
    os.close(w)
    _, anc, _, _ = a.recvmsg(1, socket.CMSG_SPACE(4))
    listener = struct.unpack("@i", anc[0][2][:4])[0]
    import select

    poller = select.poll()
    poller.register(listener, select.POLLIN)
    while True:
        events = poller.poll()
        if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events):
            break
        try:
            n = _seccomp.notif_recv(listener)
        except OSError:
            continue
        _seccomp.notif_send(listener, n.id, flags=_seccomp.CONTINUE)
    out = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    return out


def netns(cmd: list[str]) -> list[str]:
    return ["unshare", "-n", "/bin/sh", "-c", 'ip link set lo up && exec "$0" "$@"', *cmd]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def ensure_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True)  # fmt: skip


class BrokerInNetns:
    """``sockcreator serve`` in a fresh netns, allowing nobody tcp 127.0.0.1:80,
    and a world-readable copy of the package for ``run`` as nobody."""

    def __init__(self, d: Path) -> None:
        import sockcreator

        for user in ("sockc-broker", "sockc-creator"):
            ensure_user(user)
        self.world = d / "world"
        shutil.copytree(Path(sockcreator.__file__).parent, self.world / "sockcreator",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for root, _dirs, files in os.walk(self.world):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        bdir = Path(tempfile.mkdtemp(prefix="sockc-bench-broker-", dir="/tmp"))
        bdir.chmod(0o755)
        self.dir = bdir
        self.path = str(bdir / "broker.sock")
        policy = bdir / "policy.toml"
        policy.write_text('[[allow]]\nusers = ["nobody"]\nprotocols = ["tcp"]\n'
                          'addresses = ["127.0.0.1"]\nports = [80]\n')  # fmt: skip
        self.log = bdir / "broker.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                netns([sys.executable, "-m", "sockcreator.cli", "serve", "--socket", self.path,
                       "--policy", str(policy), "--user", "sockc-broker",
                       "--creator-user", "sockc-creator"]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while '"event":"ready"' not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the broker did not start: {self.log.read_text()}")
            time.sleep(0.02)

    def argv(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", "setpriv", "--reuid=65534",
                "--regid=65534", "--clear-groups", "env", f"PYTHONPATH={self.world}", PY,
                "-m", "sockcreator.cli", "run", "--broker", self.path, "--intercept", "--",
                *cmd]  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binds", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (namespaces, users)", file=sys.stderr)
        return 2
    d = Path(tempfile.mkdtemp(prefix="sockc-bench-intercept-"))
    d.chmod(0o755)
    work = d / "work.py"
    work.write_text(WORKLOAD)
    work.chmod(0o644)
    sc = [sys.executable, "-m", "sockcreator.cli", "run"]
    authbind = shutil.which("authbind")
    if authbind:
        byport = Path("/etc/authbind/byport/80")
        byport.parent.mkdir(parents=True, exist_ok=True)
        byport.touch()
        shutil.chown(byport, "nobody")
        byport.chmod(0o500)
    n, priv_n = args.binds, max(200, args.binds // 10)
    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    broker = BrokerInNetns(d)
    for _ in range(args.rounds):
        add("priv intercept", timed(netns([*sc, "--intercept", "--user", "nobody", "--allow",
                                           "tcp:127.0.0.1:80", "--", PY, str(work), "tcp", "80",
                                           str(priv_n)])))  # fmt: skip
        if authbind:
            add("priv authbind", timed(netns([*nobody, authbind, "--deep", PY, str(work),
                                              "tcp", "80", str(priv_n)])))  # fmt: skip
        add("priv broker intercept", timed(broker.argv([PY, str(work), "tcp", "80",
                                                        str(priv_n)])))  # fmt: skip
        add("cont none", timed(netns([*nobody, PY, str(work), "udp", "0", str(n)])))
        add(
            "cont floor",
            float(
                subprocess.run(
                    netns([sys.executable, __file__, "--floor", PY, str(work), "udp", "0", str(n)]),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            ),
        )
        add("cont ours", timed(netns([*sc, "--intercept", "--user", "nobody", "--allow",
                                      "tcp:127.0.0.1:80", "--", PY, str(work), "udp", "0",
                                      str(n)])))  # fmt: skip
        for mode in ("plain", "intercept"):
            opts = ["--intercept"] if mode == "intercept" else []
            t0 = time.perf_counter()
            subprocess.run(netns([*sc, *opts, "--user", "nobody", "--listen",
                                  "tcp:127.0.0.1:80", "--", "/bin/true"]), check=True)  # fmt: skip
            add(f"start {mode}", (time.perf_counter() - t0) * 1e6)
    med = {k: statistics.median(v) for k, v in results.items()}
    low = {k: min(v) for k, v in results.items()}
    print(f"{'measurement':<36} {'median':>10} {'best':>10}   (rounds: {args.rounds})")
    for k, v in med.items():
        unit = "us per bind" if not k.startswith("start") else "us"
        print(f"{k:<36} {v:>10.1f} {low[k]:>10.1f} {unit}")
    none = med["cont none"]
    print()
    if "priv authbind" in med:
        ratio = med["priv intercept"] / med["priv authbind"]
        print(f"privileged bind, intercept / authbind: {ratio:.3f}x (target <= 0.25x)"
              f" {'met' if ratio <= 0.25 else 'MISSED'}")  # fmt: skip
        ratio = med["priv broker intercept"] / med["priv authbind"]
        print(f"privileged bind through the broker, as nobody / authbind: {ratio:.3f}x")
    else:
        print("authbind is not installed: no comparison (apt-get install authbind)")
    ratio = med["priv broker intercept"] / med["priv intercept"]
    print(f"privileged bind, through the broker / with its own creator: {ratio:.2f}x")
    ratio = med["cont ours"] / med["cont floor"]
    best = low["cont ours"] / low["cont floor"]
    over = (med["cont ours"] - none) / max(med["cont floor"] - none, 1e-9)
    print(
        f"unprivileged bind (CONTINUE), ours / floor: {ratio:.3f}x median, {best:.3f}x best"
        f" (target <= 1.3x) {'met' if ratio <= 1.3 else 'MISSED'};"
        f" added cost ours / floor's: {over:.2f}x"
    )
    print(f"start-up, run --intercept / run: {med['start intercept'] / med['start plain']:.2f}x")
    broker.stop()
    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor"]:
        print(floor_supervisor(sys.argv[2:]).strip())
        sys.exit(0)
    sys.exit(main())
