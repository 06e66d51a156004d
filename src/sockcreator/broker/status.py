"""``sockcreator status --socket PATH [--json]``: list the broker's held
sockets.  The blocking client only: no asyncio, nothing of the daemon."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..client._errors import CreatorFatalError
from ._audit import describe
from .client import Broker, SocketRefusedError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``sockcreator status --socket PATH [--json]``: list held sockets."""
    p = argparse.ArgumentParser(
        prog="sockcreator status",
        description="List the broker's held sockets and their holders (root or the "
        "broker's admin group only).",
    )
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--json", action="store_true", help="one JSON object per grant")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    try:
        with Broker(args.socket, timeout=args.timeout) as broker:
            held = broker.status()
    except SocketRefusedError as e:
        print(f"sockcreator status: refused: {e.strerror} (root or the admin group only)",
              file=sys.stderr)  # fmt: skip
        return 1
    except (OSError, CreatorFatalError) as e:
        print(f"sockcreator status: {args.socket}: {e}", file=sys.stderr)
        return 1
    for h in held:
        if args.json:
            record = {"grant": h.grant, "share": h.share.name, "name": h.name,
                      "uid": h.uid, "gid": h.gid, "pid": h.pid,
                      **describe(h.request, h.backlog)}  # fmt: skip
            print(json.dumps(record, separators=(",", ":")))
        else:
            print(h)
    if not args.json:
        sockets = {(h.request.type, h.request.address, h.request.port) for h in held}
        binds = (
            ""
            if broker.binds is None
            else (f"; {broker.binds[0]} client sockets bound, {broker.binds[1]} refused")
        )
        print(f"{len(sockets)} sockets held, {len(held)} grants{binds}")
    return 0
