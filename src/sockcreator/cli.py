"""The ``sockcreator`` command."""

import os
import sys

TYPE_CHECKING = False  # (not typing's, nor __future__: ``sockcreator creator`` must start fast)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

__all__ = ["main"]

#: The privileged program, beside this file (what client._channel runs too).
_CREATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "creator.py")


def _exec_creator(creator_args: list[str]) -> int:
    """Become the creator on our own stdin/stdout: exec, no extra process,
    and nothing of this package imported first."""
    argv = [sys.executable, "-I", "-S", "-B", _CREATOR, *creator_args]
    os.execve(sys.executable, argv, {})
    raise AssertionError("not reached")


def _creator(args: "argparse.Namespace") -> int:
    return _exec_creator(args.creator_args)


def _check(args: "argparse.Namespace") -> int:
    """Start a creator, ask it for sockets, and say what happened."""
    from .client._errors import CreatorError
    from .client.blocking import SocketCreator
    from .client.specs import parse_listen

    specs = args.spec or ["tcp:127.0.0.1:0", "udp:[::1]:0"]
    try:
        requests = [parse_listen(spec, any_port=True) for spec in specs]
    except ValueError as e:
        print(f"sockcreator check: {e}", file=sys.stderr)
        return 2
    status = 0
    # The creator's policy is exactly what we ask for: a demonstration, too.
    lines = []
    with SocketCreator(timeout=args.timeout, allow=specs, user=args.user) as creator:
        for spec, req in zip(specs, requests, strict=True):
            try:
                sock = creator.get_sockets([req])[0]
            except CreatorError as e:
                lines.append(f"{spec}: FAILED {e}")
                status = 1
                continue
            with sock:
                lines.append(f"{spec}: ok, bound to {sock.getsockname()[:2]}")
        # After an answer, so the creator has hardened itself by now.
        print(f"creator pid {creator.pid}: {_proc_summary(creator.pid)}")
    print("\n".join(lines))
    return status


def _proc_summary(pid: int | None) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return "(no /proc)"
    keys = ("Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")
    return ", ".join(f"{k} {fields[k].split()[0]}" for k in keys if k in fields)


def build_parser() -> "argparse.ArgumentParser":
    import argparse

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
    p.add_argument("--user", help="run the creator as this user (when root)")
    p.set_defaults(func=_check)

    # Listed here for --help; main() hands its arguments to run.launcher.main,
    # which has its own parser (options before PROGRAM, exit status 100).
    sub.add_parser(
        "run",
        help="exec PROGRAM as a user, with privileged sockets (see 'run --help')",
        add_help=False,
    )
    # Likewise: broker.serve.main and .status_main parse their own arguments.
    sub.add_parser("serve", help="run the socket broker (see 'serve --help')", add_help=False)
    sub.add_parser("status", help="list the broker's held sockets", add_help=False)
    return parser


def main(argv: "Sequence[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["creator"] and not {"-h", "--help"} & set(argv[1:2]):
        return _exec_creator(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    if argv[:1] == ["run"]:
        from .run.launcher import main as run_main

        return run_main(argv[1:])
    if argv[:1] in (["serve"], ["status"]):
        if argv[0] == "status":  # the blocking client only: no asyncio
            from .broker.status import main as status_main

            return status_main(argv[1:])
        from .broker.serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "creator" and args.creator_args[:1] == ["--"]:
        args.creator_args = args.creator_args[1:]
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
