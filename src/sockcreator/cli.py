"""The ``sockcreator`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._channel import CREATOR_PATH

__all__ = ["main"]


def _creator(args: argparse.Namespace) -> int:
    """Become the creator on our own stdin/stdout: exec, no extra process."""
    argv = [sys.executable, "-I", "-S", "-B", CREATOR_PATH, *args.creator_args]
    os.execve(sys.executable, argv, {})
    raise AssertionError("not reached")


def _check(args: argparse.Namespace) -> int:
    """Start a creator, ask it for sockets, and say what happened."""
    from ._errors import CreatorError
    from .client import SocketCreator

    specs = args.spec or ["tcp:127.0.0.1:0", "udp:[::1]:0"]
    requests = []
    for spec in specs:
        proto, _, rest = spec.partition(":")
        host, _, port = rest.rpartition(":")
        requests.append((proto, host.strip("[]"), int(port)))
    status = 0
    with SocketCreator(timeout=args.timeout) as creator:
        print(f"creator pid {creator.pid}: {_proc_summary(creator.pid)}")
        for spec, req in zip(specs, requests, strict=True):
            try:
                sock = creator.get_socket(*req)
            except CreatorError as e:
                print(f"{spec}: FAILED {e}")
                status = 1
                continue
            with sock:
                print(f"{spec}: ok, fd {sock.fileno()} bound to {sock.getsockname()[:2]}")
    return status


def _proc_summary(pid: int | None) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return "(no /proc)"
    keys = ("Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")
    return ", ".join(f"{k} {fields[k].split()[0]}" for k in keys if k in fields)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockcreator", description="Privileged ports for unprivileged daemons."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "creator",
        help="exec the privileged creator on this process's stdin/stdout",
        description="Exec the creator (python -I -S -B creator.py, empty environment). "
        "Options after '--' go to the creator: --allow SPEC, --allow-all, "
        "--uid N --gid N, --no-harden.",
    )
    p.add_argument("creator_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_creator)

    p = sub.add_parser("check", help="start a creator, get sockets, report")
    p.add_argument("spec", nargs="*", help="PROTO:ADDR:PORT, e.g. tcp:127.0.0.1:80")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "creator" and args.creator_args[:1] == ["--"]:
        args.creator_args = args.creator_args[1:]
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
