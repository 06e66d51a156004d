"""``sockcreator serve``: one broker hands privileged sockets to many programs.

::

    sockcreator serve --socket PATH [--policy FILE] --user U --creator-user C
                      [--mode 0666] [--group G] [--admin-group G] [--loop auto]
                      [limits...]

Started as root, in this order:

1. Load the policy file (:mod:`sockcreator.broker.policy`), resolve U, C
   and the groups -- before anything is started.
2. Start the hardened creator (dropping to C, keeping only
   CAP_NET_BIND_SERVICE) with the union of the policy as its allow-list: the
   creator fences in everything, the broker checks each user exactly.  C
   must be a user of its own, neither U nor root: Linux charges descriptors
   in flight to the sender's user, and clients can make the broker's sends
   wait (see "Descriptors in flight" in :mod:`._server`), so the
   creator must not share U's budget.
3. Create the listening socket at PATH safely, following no symlink that
   anyone but root controls.  PATH's directory is reached by walking it from
   ``/`` one component at a time with ``O_PATH|O_NOFOLLOW`` descriptors: each
   directory entered must be owned by root (or us) and not writable by
   others unless sticky; a symlink is followed only if root owns it (so it
   sits in a directory that passed: nobody else can replace it), its target
   walked the same way; anyone else's symlink is refused (exit 4).  All the
   rest goes through the final directory's descriptor, never the path: an
   existing PATH is replaced only if it is a socket nobody answers on; the
   socket is bound under a temporary name there (via ``/proc/self/fd/N``)
   with its mode set by the umask at bind time (no chmod), chowned to the
   group without following links, set listening, and renamed over PATH.  At
   stop the broker removes PATH through the same descriptor if the inode is
   still its own.
4. Drop privileges to U for good (:func:`~.privileges.drop_privileges`).
   Started from a terminal (as root), the broker first forks as ``sockcreator
   run`` does (:mod:`sockcreator._terminal`): it serves in a new session,
   with no readable handle on the terminal, while a relay in root's session
   forwards signals, drops to U once the broker has, and exits with its
   status.
5. Serve, in one asyncio process (:mod:`._server`): a reader
   callback per connection, every read and write bounded and, while a frame
   is unfinished or an answer unread, timed out.  A slow or stuck client
   delays nobody else.

Each peer is identified by SO_PEERCRED (uid, gid, pid) and SO_PEERGROUPS (its
supplementary groups) when it connects.  The wire protocol is in
:mod:`sockcreator.broker._protocol`; the sharing rules are BIND 10's:

- one cached socket per (protocol, address, port), with the options and
  backlog it was made with, and one reference per grant;
- NO: nobody else may hold it; SAMEAPP: only requests with the same share
  name, from the same uid; ANY: anyone whose own mode allows it.  Both the
  holder's mode and the requester's count;
- another request for a held socket with other options (or another backlog)
  is a conflict (EBUSY);
- a grant ends by an explicit release, or when its connection closes (its
  process died); the cached socket is closed with its last grant;
- port 0 asks for a new socket on an ephemeral port each time; it is cached
  under the port it got.

Every grant, denial and release is one JSON line on stderr (the audit log),
written before its answer is sent.

SIGHUP reloads the policy; sd_notify; a socket passed by the starter
(LISTEN_FDS): :mod:`._daemon` (docs/broker.md, "Reloading the policy").  As
root, before the drop, serve forks the creator factory (:mod:`._factory`),
which starts a new creator for a reload that needs a wider allow-list.

The pieces are listed in :mod:`sockcreator.broker`; this module is the command line.

Exit statuses: 0 stopped by SIGTERM/SIGINT; 1 the creator died; 3 bad
configuration (policy, user, group, limits, NOTIFY_SOCKET); 4 the socket
path (or the passed socket) cannot be used; 5 the creator cannot be
started; 6 privileges cannot be dropped.

Size: the command line and the start-up order (creator, factory, socket,
drop, daemon), which an auditor reads as one sequence.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from .._terminal import fork_relay, terminal_in_reach
from ..client._channel import creator_argv
from ..client._errors import CreatorFatalError
from ..privileges import drop_privileges, resolve_credentials
from . import _notify
from ._creator import CreatorChannel
from ._daemon import Daemon, take_environment
from ._factory import Factory, start_factory
from ._path import SocketFile, SocketPathError, bind_unix_socket, create_socket_file
from ._server import BrokerConfig, BrokerServer, Peer, peer_credentials
from ._table import shareable
from .policy import PolicyError, load_policy

__all__ = [
    "EXIT_CONFIG",
    "EXIT_CREATOR",
    "EXIT_CREATOR_DIED",
    "EXIT_OK",
    "EXIT_PRIVILEGES",
    "EXIT_SOCKET",
    "BrokerConfig",
    "BrokerServer",
    "CreatorChannel",
    "Peer",
    "SocketFile",
    "SocketPathError",
    "bind_unix_socket",
    "build_parser",
    "create_socket_file",
    "main",
    "peer_credentials",
    "shareable",
    "status_main",
]

EXIT_OK, EXIT_CREATOR_DIED, EXIT_CONFIG, EXIT_SOCKET, EXIT_CREATOR, EXIT_PRIVILEGES = (
    0,
    1,
    3,
    4,
    5,
    6,
)
DEFAULT_POLICY = "/etc/sockcreator/broker.toml"
_PROG = "sockcreator serve"


# --- the command ----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def _mode(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=_PROG,
        description="Hand privileged sockets to unprivileged programs over a Unix socket, "
        "with per-user policy and BIND 10's sharing rules.  Start as root.",
        epilog="Exit statuses: 0 stopped; 1 the creator died; 3 bad configuration; "
        "4 the socket path cannot be used; 5 the creator cannot start; "
        "6 privileges cannot be dropped.",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the broker's Unix socket (required unless the starter passes one: "
        "LISTEN_FDS; given too, it must be that socket's path)",
    )
    p.add_argument(
        "--policy", default=DEFAULT_POLICY, metavar="FILE", help=f"TOML (default {DEFAULT_POLICY})"
    )
    p.add_argument("--user", "-u", help="run the broker as this user (required as root)")
    p.add_argument(
        "--creator-user",
        metavar="USER",
        help="run the creator as this user: one of its own, not --user (required as root)",
    )
    p.add_argument(
        "--mode",
        type=_mode,
        help="socket file mode, octal (default 0666); with an inherited socket: checked, not set",
    )
    p.add_argument("--group", "-g", help="socket file group (inherited socket: checked)")
    p.add_argument("--admin-group", help="members may ask for status (root always may)")
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--max-connections-per-user", type=int, default=64)
    p.add_argument("--max-held", type=int, default=4096, help="grants per connection")
    p.add_argument("--max-pending", type=int, default=32, help="unanswered requests per connection")
    p.add_argument(
        "--max-sockets", type=int, help="cached sockets in all (default: from RLIMIT_NOFILE)"
    )
    p.add_argument("--client-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep a socket open this long after its last grant ends, for its holder's "
        "successor (zero-downtime restarts; default 0: close at once)",
    )
    p.add_argument(
        "--max-linger",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the most linger a request may ask for itself (run --broker --linger; "
        "default: --linger)",
    )
    p.add_argument(
        "--max-inflight-per-user",
        type=int,
        default=256,
        metavar="N",
        help="descriptors sent to one user's connections and not read yet (default 256); "
        "beyond it, that user's answers wait",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop (the 'fast' extra) serves about 10 %% more grants "
        "per CPU second; auto (default): uvloop if installed, else asyncio's own",
    )
    return p


def _loop_runner(name: str) -> tuple[str, Callable[[Coroutine[Any, Any, int]], int]]:
    """The event loop to serve on: its name and how to run a coroutine on it.
    An explicit ``uvloop`` that is not installed is an ImportError."""
    if name != "asyncio":
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return "uvloop", uvloop.run
    return "asyncio", asyncio.run


def _fail(status: int, message: str) -> int:
    print(f"{_PROG}: {message}", file=sys.stderr)
    return status


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


async def _run(
    args: argparse.Namespace,
    config: BrokerConfig,
    allow: list[str] | None,
    loop_name: str,
) -> int:
    root = os.geteuid() == 0
    notifier: _notify.Notifier = args.notifier
    factory: Factory | None = args.factory
    daemon: Daemon | None = None
    try:
        creator = CreatorChannel(
            creator_argv(allow=allow, user=args.creator_user if root else None)
        )
        creator.start()
    except (OSError, ValueError, KeyError) as e:  # (the factory exits with us)
        return _fail(EXIT_CREATOR, f"cannot start the creator: {e}")
    try:
        socket_file: SocketFile | None = None
        if args.inherited is not None:
            listener = args.inherited
            where = args.socket_path
        else:
            gid = grp.getgrnam(args.group).gr_gid if args.group else None
            mode = 0o666 if args.mode is None else args.mode
            try:
                socket_file = create_socket_file(args.socket, mode, gid)
            except (SocketPathError, OSError) as e:
                return _fail(EXIT_SOCKET, str(e))
            listener = socket_file.socket
            where = os.path.abspath(args.socket)
        with contextlib.ExitStack() as stack:
            # closes the socket (and the directory's descriptor) at the end
            stack.enter_context(socket_file or contextlib.closing(listener))
            policy_dir = args.policy_dir  # (opened in _main, as root)
            stack.callback(os.close, policy_dir)
            if root:
                try:
                    drop_privileges(args.user)
                    if args.relay_ready is not None:  # the relay may drop now too
                        os.close(args.relay_ready)
                        args.relay_ready = None
                except (OSError, ValueError, LookupError) as e:
                    return _fail(EXIT_PRIVILEGES, f"cannot drop privileges: {e}")
            server = BrokerServer(config, creator, listener)
            daemon = Daemon(
                args.policy, policy_dir, server, config.policy, allow, notifier, factory
            )

            def creator_died(e: CreatorFatalError) -> None:
                server.audit.log("fatal", what="creator", error=str(e))
                assert daemon is not None
                daemon.stop(EXIT_CREATOR_DIED)

            creator.on_fatal = daemon.on_creator_fatal = creator_died
            if factory is not None:
                factory.attach(
                    lambda reason: server.audit.log("error", what="factory", error=reason)
                )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, daemon.stop, EXIT_OK)
            loop.add_signal_handler(signal.SIGHUP, daemon.reload)
            server.audit.log(
                "start",
                pid=os.getpid(),
                creator_pid=creator.pid,
                factory_pid=factory.pid if factory is not None else None,
                socket=where,
                inherited=args.inherited is not None,
                notify=notifier.address or None,
                watchdog_usec=notifier.watchdog_usec,
                uid=os.getuid(),
                allow=allow,
                loop=loop_name,
            )
            daemon.start(creator)
            status = await server.serve()
            server.audit.log("stop", status=status)
            server.audit.flush()
            if socket_file is not None:
                # Ours still?  Through the directory's descriptor, following
                # nothing; needs write access to it, which went with root: may fail.
                socket_file.unlink_if_ours()
            return status
    finally:  # the creator in service, any retiring one, the factory
        await (daemon.close() if daemon is not None else creator.terminate())
        if factory is not None:
            await factory.close()  # (again, if the daemon did: a no-op)
        notifier.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``sockcreator serve``: run until SIGTERM; the exit status."""
    args = build_parser().parse_args(argv)
    root = os.geteuid() == 0
    problem = take_environment(args)  # first: no child may see the starter's variables
    if problem is not None:
        return _fail(EXIT_SOCKET if problem[0] == "socket" else EXIT_CONFIG, problem[1])
    status = _main(args, root)
    if args.inherited is not None and args.inherited.fileno() != -1:
        args.inherited.close()
    args.notifier.close()
    return status


def _main(args: argparse.Namespace, root: bool) -> int:
    if root and args.user is None:
        return _fail(EXIT_CONFIG, "give --user: the broker does not run as root")
    if root and args.creator_user is None:
        return _fail(
            EXIT_CONFIG,
            "give --creator-user: a user of its own for the creator, not --user "
            "(see docs/security.md)",
        )
    try:
        if args.user is not None:
            creds = resolve_credentials(args.user)
            if creds.uid == 0:
                return _fail(EXIT_CONFIG, "--user must not be root")
            if not root and creds.uid != os.geteuid():
                return _fail(EXIT_CONFIG, "--user needs root (we are not root)")
        if args.creator_user is not None:
            if not root:
                return _fail(EXIT_CONFIG, "--creator-user needs root (we are not root)")
            creator_uid = resolve_credentials(args.creator_user).uid
            if creator_uid == 0:
                return _fail(EXIT_CONFIG, "--creator-user must not be root")
            if args.user is not None and creator_uid == resolve_credentials(args.user).uid:
                return _fail(EXIT_CONFIG, "--creator-user must not be --user")
        admin = grp.getgrnam(args.admin_group).gr_gid if args.admin_group else None
        if args.group:
            grp.getgrnam(args.group)
    except (LookupError, ValueError) as e:
        return _fail(EXIT_CONFIG, str(e).strip("'\""))
    try:
        policy = load_policy(args.policy)
    except (OSError, PolicyError) as e:
        return _fail(EXIT_CONFIG, f"policy {args.policy}: {e}")
    if not policy.rules:
        return _fail(EXIT_CONFIG, f"policy {args.policy} allows nothing")
    nofile = _raise_nofile()
    max_sockets = args.max_sockets or max(16, nofile - args.max_connections - 64)
    if max_sockets + args.max_connections + 64 > nofile:
        return _fail(
            EXIT_CONFIG,
            f"RLIMIT_NOFILE {nofile} is too low for {max_sockets} sockets and "
            f"{args.max_connections} connections (raise it, or lower the limits)",
        )
    try:
        config = BrokerConfig(
            policy=policy,
            admin_gid=admin,
            max_connections=args.max_connections,
            max_connections_per_uid=args.max_connections_per_user,
            max_held=args.max_held,
            max_pending=args.max_pending,
            max_sockets=max_sockets,
            client_timeout=args.client_timeout,
            linger=args.linger,
            max_linger=args.max_linger,
            max_inflight_per_uid=args.max_inflight_per_user,
            # Linux refuses a send once the sender's user has more in flight
            # than its RLIMIT_NOFILE: stay well within it.
            max_inflight=max(args.max_inflight_per_user, nofile // 2),
        )
    except ValueError as e:
        return _fail(EXIT_CONFIG, str(e))
    try:
        loop_name, run = _loop_runner(args.loop)
    except ImportError as e:
        return _fail(EXIT_CONFIG, f"--loop uvloop: {e} (install the 'fast' extra)")
    args.relay_ready = None
    if root and terminal_in_reach():
        # Started from a terminal: the broker, which reads every client, must
        # not hold root's (TIOCSTI, reading what root types).  As for
        # ``sockcreator run``: a new session, and a relay left in root's.
        try:
            args.relay_ready = fork_relay(resolve_credentials(args.user), _PROG)
        except OSError as e:
            return _fail(EXIT_PRIVILEGES, str(e))
    try:  # (for reloads: the policy's directory may be closed to --user)
        where = os.path.dirname(os.path.abspath(args.policy))
        args.policy_dir = os.open(where, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return _fail(EXIT_CONFIG, f"policy {args.policy}: its directory: {e.strerror}")
    args.factory = None
    if root:  # before the drop, and before the event loop: see ._factory
        try:
            args.factory = start_factory(args.policy, args.policy_dir, args.creator_user)
        except OSError as e:
            os.close(args.policy_dir)
            return _fail(EXIT_CREATOR, f"cannot start the creator factory: {e}")
    return run(_run(args, config, policy.creator_allow(), loop_name))


def status_main(argv: Sequence[str] | None = None) -> int:
    """``sockcreator status``: see :mod:`.status` (kept here for old callers)."""
    from .status import main as status

    return status(argv)
