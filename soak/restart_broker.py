"""Restarts that refuse nothing: a server under ``sockcreator run --broker
--share SAMEAPP`` is restarted again and again while a client opens a fresh
connection every millisecond or so; prints what the client saw.

Run as root inside the broker's network namespace (the broker must allow
USER tcp 127.0.0.1:PORT), e.g.::

    nsenter --net=/proc/$(pgrep -f 'sockcreator.cli serve')/ns/net \\
        python soak/restart_broker.py --socket /run/sockcreator/broker.sock \\
        --user alice --restarts 20

Each restart: once the server has answered, SIGTERM (its graceful stop),
wait until it has exited, wait ``--pause`` (at least 0.2 s) more, start it again.  With the
broker's ``--linger`` longer than the gap, the listening socket outlives the
server, the kernel queues the connections that come meanwhile in its
backlog, and the next server answers them: 0 refused.  Without linger the
socket closes with its last holder and those connections are refused.

The server is a small stdlib HTTP server on descriptor 3 (``LISTEN_FDS``),
run by Debian's python3 as USER; any socket-activation-aware server
(gunicorn, ...) would do the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SERVER = r"""
import signal, socket, sys
listener = socket.socket(fileno=3)
listener.settimeout(0.05)
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
while not stopping:
    try:
        conn, _ = listener.accept()
    except (TimeoutError, InterruptedError):
        continue
    with conn:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
"""


class Client(threading.Thread):
    """A fresh connection every ``interval``; one full answer each."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.counts = {"ok": 0, "refused": 0, "reset": 0, "timeout": 0, "other": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as c:
                    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    answer = b""
                    while chunk := c.recv(4096):
                        answer += chunk
                key = "ok" if answer.endswith(b"ok\n") else "other"
            except ConnectionRefusedError:
                key = "refused"
            except ConnectionResetError:
                key = "reset"
            except TimeoutError:
                key = "timeout"
            except OSError:
                key = "other"
            self.counts[key] += 1
            time.sleep(self.interval)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="the broker's socket")
    ap.add_argument("--user", required=True, help="run the server as this user")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--pause", type=float, default=0.25, help="seconds after exit (>= 0.2)")
    ap.add_argument("--interval", type=float, default=0.001, help="between connections")
    ap.add_argument(
        "--linger",
        type=float,
        help="run --linger SECONDS: the server asks for its own (serve --max-linger caps it)",
    )
    ap.add_argument(
        "program",
        nargs="*",
        metavar="-- PROGRAM",
        help="the server to restart (default: a stdlib one); it must take its socket from "
        "LISTEN_FDS and answer every request with a body ending in 'ok\\n', e.g. gunicorn",
    )
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="sockc-restart-"))
    d.chmod(0o755)
    (d / "server.py").write_text(SERVER)
    (d / "server.py").chmod(0o644)
    argv = [sys.executable, "-m", "sockcreator.cli", "run", "--broker", args.socket,
            "--user", args.user, "--share", "SAMEAPP", "--share-name", "web",
            *(["--linger", str(args.linger)] if args.linger is not None else []),
            "--listen", f"tcp:127.0.0.1:{args.port}", "--",
            *(args.program or ["/usr/bin/python3", str(d / "server.py")])]  # fmt: skip

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    server = start()
    deadline = time.monotonic() + 30
    while True:  # until the first server answers
        try:
            with socket.create_connection(("127.0.0.1", args.port), timeout=2) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if c.recv(100):
                    break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                print("the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
    client = Client(args.port, args.interval)
    client.start()
    statuses = []
    try:
        for _ in range(args.restarts):
            served = client.counts["ok"]
            deadline = time.monotonic() + 30
            while client.counts["ok"] <= served + 5 and time.monotonic() < deadline:
                time.sleep(0.01)  # the new server is serving: now its graceful stop
            server.send_signal(signal.SIGTERM)
            statuses.append(server.wait(60))  # (a graceful stop may take its time)
            time.sleep(max(args.pause, 0.2))
            server = start()
        time.sleep(0.5)
    finally:
        client.stop.set()
        client.join(30)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({"restarts": args.restarts, "server_statuses": sorted(set(statuses)),
                      **client.counts}))  # fmt: skip
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root (the server is started as --user)")
    sys.exit(main())
