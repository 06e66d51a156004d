"""``sockcreator run``: privileged ports for any program, then get out of the way.

::

    sockcreator run [--user U] [--group G] [--listen SPEC]... [--allow SPEC]...
                    [--name NAME]... [--backlog N] [--allow-root] -- PROGRAM [ARGS]
    sockcreator run --broker PATH [--listen SPEC]... [--name NAME]... [--backlog N]
                    -- PROGRAM [ARGS]

Started as root, in this order:

1. Check the arguments (specs, names), that we are root, who U (and G) is,
   and where PROGRAM is (a PATH lookup, done now, as root) -- before
   anything is started.
2. Start the hardened creator, allowing the --listen and --allow specs and
   dropping to U's uid and gid: it keeps only CAP_NET_BIND_SERVICE.
3. Get every --listen socket from it (this process never binds: one code
   path), and listen(backlog) on the TCP ones.
4. Drop our own privileges to U for good (:func:`~.privileges.drop_privileges`).
5. Put the sockets at descriptors 3, 4, ... and the creator channel right
   after them; every other descriptor above 2 is made close-on-exec.
6. Exec PROGRAM in place (same pid: no supervisor is left) with, as systemd
   would set them, ``LISTEN_FDS``, ``LISTEN_PID``, ``LISTEN_FDNAMES``, and
   ``SOCKCREATOR_FD`` (the channel; :meth:`SocketCreator.from_environment`
   reads it).  ``HOME``, ``USER`` and ``LOGNAME`` become U's.

From a terminal, one step comes first (below); without one (systemd, cron,
a pipeline without a terminal) nothing else changes.

From root's terminal
--------------------
A process in root's session whose controlling terminal is root's can type
into root's shell (``TIOCSTI``) and read what root types; PROGRAM must be
neither.  So when we are root, dropping to another uid, and a terminal is in
reach -- one of descriptors 0-2 is a terminal, or we have a controlling
terminal -- we fork before step 2:

* The child calls ``setsid()``: a new session, with no controlling terminal.
  TIOCSTI then fails (EPERM: the terminal is not the caller's controlling
  one), ``/dev/tty`` fails (ENXIO), and no terminal signal reaches it
  directly.  Still root, it replaces its terminal stdio: stdin becomes
  /dev/null, a terminal stdout or stderr a new write-only open of the same
  terminal (``/proc/self/fd/N``, ``O_WRONLY|O_NOCTTY``).  Output still shows,
  but that descriptor cannot be read, and cannot make the terminal a
  controlling one (the kernel wants read access); PROGRAM cannot open the
  terminal itself (``/dev/pts/N`` is root's, 0620 or 0600).  This happens
  at once, not just before the exec, so that the creator, which inherits
  stderr, never holds a readable handle on the terminal either.  Then steps
  2 to 6; ``LISTEN_PID`` is the child's pid: PROGRAM's.
* The parent stays in root's session, in the foreground process group, as a
  small signal relay: its 0-2 become /dev/null and everything else it
  inherited is closed, so it holds no readable handle on the terminal.  It
  forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH to
  the child (through a pidfd: never to a reused pid) and exits with the
  child's status, 128+N if signal N killed it, as a shell would; so Ctrl-C
  still stops PROGRAM, and the exit statuses above are unchanged.  The
  signals are blocked from before the fork until the relay's handlers are
  in place, so none is lost.  Once the child has dropped (the relay sees EOF
  on a close-on-exec pipe when PROGRAM starts, or the child exits) the relay
  drops to U as well and makes itself non-dumpable: PROGRAM, the same uid,
  may signal it but neither ptrace it nor read its /proc files.  It stays
  root until then because a process of U's may not signal the child while
  that is still root.

"A terminal in reach", not only ``isatty``: ``run ... </dev/null >log 2>&1``
from root's shell leaves no terminal on 0-2, yet PROGRAM, still in root's
session, could open ``/dev/tty`` (mode 0666: it is the caller's controlling
terminal) and type through it.

Limits.  PROGRAM cannot read interactive input (stdin is /dev/null, it has
no /dev/tty).  Job control reaches only the relay: Ctrl-Z stops the relay
while PROGRAM runs on.  PROGRAM still writes to the terminal, so, as with any
program whose output root watches, it can send escape sequences (some
terminal emulators answer a few with input) and change the terminal's
settings (termios ioctls need no read access).  A terminal that belongs to
U (root by su or sudo in U's own terminal) U can open anyway.  A relay
killed by SIGKILL forwards nothing: PROGRAM runs on in its own session.

The creator is PROGRAM's child: when PROGRAM exits or dies it sees EOF, and
PR_SET_PDEATHSIG kills it if it is not reading.

With ``--broker PATH`` there is no creator and no root anywhere: an ordinary
user gets the --listen sockets from the broker (``sockcreator serve``) at
PATH, as its policy allows them to that user, and PROGRAM inherits the
broker connection as ``SOCKCREATOR_BROKER_FD`` (the grants last as long as
it is open: :meth:`Broker.from_environment` reads it).  Started as root,
--user still applies, and we drop to U before connecting, so the broker sees
U.

Exit statuses (before PROGRAM runs; afterwards the status is PROGRAM's)::

    100  usage: bad option, SPEC or NAME, no PROGRAM, PROGRAM as root refused
    101  not started as root
    102  unknown user or group
    103  the creator failed (did not start, died, broke the protocol), or
         the broker could not be reached or failed
    104  a --listen socket was refused (the kernel's errno is printed)
    105  --intercept: bind interception is not available here (the kernel
         or the machine lacks it: Linux 5.19+, x86_64 or aarch64)
    111  another system failure (dropping privileges, descriptors)
    126  PROGRAM was found but cannot be executed
    127  PROGRAM not found

Size: about a quarter of this file is this docstring, the design of
``run`` argued in one place; the code itself is under 400 lines.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Sequence

from .._terminal import fork_relay, open_fds, terminal_in_reach
from ..client import specs
from ..client._channel import creator_argv
from ..client._errors import CreatorError, CreatorFatalError, SocketCreationError
from ..client._protocol import Request
from ..client.blocking import ENV_FD, SocketCreator
from ..privileges import Credentials, drop_to, make_non_dumpable, resolve_credentials

TYPE_CHECKING = False  # (not typing's: see _record)
if TYPE_CHECKING:
    import argparse
    import signal
    from dataclasses import dataclass
    from typing import NoReturn

    from ..broker.client import Broker
else:
    import _signal as signal  # (as in _terminal: no enums made at import)

    from .._record import dataclass

__all__ = [
    "EXIT_CANNOT_EXEC",
    "EXIT_CREATOR",
    "EXIT_NOT_FOUND",
    "EXIT_NOT_ROOT",
    "EXIT_NO_INTERCEPT",
    "EXIT_REFUSED",
    "EXIT_SYSTEM",
    "EXIT_UNKNOWN_USER",
    "EXIT_USAGE",
    "LaunchError",
    "build_parser",
    "main",
]

EXIT_USAGE = 100
EXIT_NOT_ROOT = 101
EXIT_UNKNOWN_USER = 102
EXIT_CREATOR = 103
EXIT_REFUSED = 104
EXIT_NO_INTERCEPT = 105
EXIT_SYSTEM = 111
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127

_PROG = "sockcreator run"
#: broker.client.ENV_BROKER_FD, spelled here: the broker client (and its wire
#: protocol, about 70 ms of imports) is loaded only for --broker.
ENV_BROKER_FD = "SOCKCREATOR_BROKER_FD"
#: activation.SD_LISTEN_FDS_START, spelled here too: that module (the side
#: of PROGRAM, which reads LISTEN_FDS) is not loaded to start it.
SD_LISTEN_FDS_START = 3


class LaunchError(Exception):
    """A failure before PROGRAM runs, with its exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    p = _Parser(
        prog=_PROG,
        description="Run PROGRAM as an unprivileged user with privileged listening sockets "
        "at descriptors 3, 4, ... (systemd socket activation) and a connection to a "
        "hardened socket creator.  Must be started as root.",
        epilog="Exit statuses before PROGRAM runs: 100 usage, 101 not root, 102 unknown "
        "user/group, 103 creator failed, 104 --listen socket refused, 111 system failure, "
        "126 PROGRAM cannot be executed, 127 PROGRAM not found.",
    )
    p.add_argument("--user", "-u", help="run PROGRAM (and the creator) as this user")
    p.add_argument("--group", "-g", help="the only group (default: the user's groups)")
    p.add_argument(
        "--listen",
        "-l",
        action="append",
        default=[],
        metavar="SPEC",
        help="tcp|udp:ADDR:PORT to bind before PROGRAM starts (ADDR 1.2.3.4 or [::1])",
    )
    p.add_argument(
        "--allow",
        "-a",
        action="append",
        default=[],
        metavar="SPEC",
        help="PROTO:ADDR:PORTS PROGRAM may also ask the creator for at runtime "
        "(PROTO tcp|udp|*, ADDR 1.2.3.4|[::1]|*, PORTS 80 or 8000-8080)",
    )
    p.add_argument(
        "--name",
        "-n",
        action="append",
        default=[],
        help="LISTEN_FDNAMES entry, one per --listen in order (default: PROTO-PORT)",
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=socket.SOMAXCONN,
        help=f"listen() backlog of TCP sockets (default {socket.SOMAXCONN})",
    )
    p.add_argument("--allow-root", action="store_true", help="allow PROGRAM to run as root (uid 0)")
    p.add_argument(
        "--intercept",
        action="store_true",
        help="let PROGRAM (any program, unmodified) bind the --listen and --allow "
        "ports itself: its bind() calls go to a supervisor (Linux 5.19+; see docs/intercept.md)",
    )
    p.add_argument(
        "--share",
        choices=("NO", "SAMEAPP", "ANY"),
        default="NO",
        help="with --broker: the share mode of every --listen socket (default NO); "
        "SAMEAPP lets a restarted PROGRAM (or its other workers) get the same sockets",
    )
    p.add_argument(
        "--share-name",
        default="",
        metavar="NAME",
        help="with --broker: the share name (SAMEAPP needs one)",
    )
    p.add_argument(
        "--linger",
        type=float,
        metavar="SECONDS",
        help="with --broker: ask the broker to keep each --listen socket open this long "
        "after PROGRAM's grant ends, for its successor (capped by serve --max-linger)",
    )
    p.add_argument(
        "--broker",
        metavar="PATH",
        help="get the --listen sockets from the broker at PATH (no creator, no root needed)",
    )
    p.add_argument("program", metavar="PROGRAM", help="program to exec (PATH is searched)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    return p


# The options of build_parser() by option string (flags, then those taking a
# value): what _parse_plain() takes without argparse.
_FLAGS = {"--allow-root": "allow_root", "--intercept": "intercept"}
_VALUED = {
    **dict.fromkeys(("--user", "-u"), "user"),
    **dict.fromkeys(("--group", "-g"), "group"),
    **dict.fromkeys(("--listen", "-l"), "listen"),
    **dict.fromkeys(("--allow", "-a"), "allow"),
    **dict.fromkeys(("--name", "-n"), "name"),
    "--backlog": "backlog",
    "--share": "share",
    "--share-name": "share_name",
    "--linger": "linger",
    "--broker": "broker",
}
_SHARES = ("NO", "SAMEAPP", "ANY")


def _parse_plain(argv: Sequence[str]) -> argparse.Namespace | None:
    """What ``build_parser().parse_args(argv)`` gives, for the plain command
    lines: options spelled in full (``--listen SPEC``, ``-l SPEC``), values
    that do not start with '-', then PROGRAM (after ``--``, or the first
    argument that is not an option).  None for anything else (help, ``=``,
    abbreviations, bad values, no PROGRAM...): argparse then parses it, and
    explains.  ``import argparse`` (with re and gettext) is a fifth of
    ``run``'s start-up."""
    from types import SimpleNamespace

    ns: dict[str, object] = {
        "user": None, "group": None, "listen": [], "allow": [], "name": [],
        "backlog": socket.SOMAXCONN, "allow_root": False, "intercept": False, "share": "NO",
        "share_name": "", "linger": None, "broker": None,
    }  # fmt: skip
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _FLAGS:
            ns[_FLAGS[arg]] = True
            i += 1
            continue
        dest = _VALUED.get(arg)
        if dest is None:
            break
        if i + 1 == len(argv) or argv[i + 1].startswith("-"):
            return None
        value: object = argv[i + 1]
        try:
            if dest == "backlog":
                value = int(argv[i + 1])
            elif dest == "linger":
                value = float(argv[i + 1])
        except ValueError:
            return None
        if dest == "share" and value not in _SHARES:
            return None
        if dest in ("listen", "allow", "name"):
            ns[dest].append(value)  # type: ignore[attr-defined]
        else:
            ns[dest] = value
        i += 2
    if argv[i : i + 1] == ["--"]:
        i += 1
    rest = list(argv[i + 1 :])
    if i == len(argv) or argv[i].startswith("-") or "--" in rest:
        return None
    return SimpleNamespace(**ns, program=argv[i], args=rest)  # type: ignore[return-value]


@dataclass(frozen=True)
class Plan:
    """Everything decided before anything is started."""

    listens: tuple[Request, ...]
    listen_specs: tuple[str, ...]
    allow_specs: tuple[str, ...]
    names: tuple[str, ...]
    backlog: int
    creds: Credentials
    executable: str
    argv: tuple[str, ...]
    broker: str | None = None
    intercept: bool = False
    share: str = "NO"
    share_name: str = ""
    linger: float | None = None


def default_name(request: Request) -> str:
    """``tcp-80``, ``udp-53``: what LISTEN_FDNAMES says without --name."""
    return f"{request.protocol}-{request.port}"


def _check_name(name: str) -> str:
    # systemd's rule for FileDescriptorName=: 1..255 printable ASCII, no ':'
    if not 0 < len(name) <= 255 or not (name.isascii() and name.isprintable()) or ":" in name:
        raise LaunchError(
            EXIT_USAGE, f"bad --name {name!r}: 1 to 255 printable ASCII characters, no ':'"
        )
    return name


def find_program(program: str, path: str | None) -> str:
    """PROGRAM's path, as execvp would find it; LaunchError 127/126 if not."""
    if not program:
        raise LaunchError(EXIT_NOT_FOUND, "PROGRAM is empty")
    if "/" in program:
        if not os.path.exists(program):
            raise LaunchError(EXIT_NOT_FOUND, f"{program}: not found")
        return program
    found_unusable = None
    for directory in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            found_unusable = found_unusable or candidate
    if found_unusable is not None:
        raise LaunchError(EXIT_CANNOT_EXEC, f"{found_unusable}: not executable")
    raise LaunchError(EXIT_NOT_FOUND, f"{program}: not found in PATH")


def plan(args: argparse.Namespace, environ: dict[str, str]) -> Plan:
    """Check everything that can be checked before starting anything."""
    try:
        listens = tuple(specs.parse_listen(s) for s in args.listen)
        for spec in args.allow:
            specs.parse_rule(spec)
    except ValueError as e:
        raise LaunchError(EXIT_USAGE, str(e)) from None
    if not listens and not args.allow and not (args.intercept and args.broker is not None):
        raise LaunchError(EXIT_USAGE, "give at least one --listen or --allow")
    if args.name and len(args.name) != len(listens):
        raise LaunchError(
            EXIT_USAGE, f"{len(args.name)} --name for {len(listens)} --listen: give one each"
        )
    names = tuple(_check_name(n) for n in args.name) or tuple(default_name(r) for r in listens)
    if not 0 <= args.backlog <= 2**31 - 1:
        raise LaunchError(EXIT_USAGE, f"bad --backlog {args.backlog}")
    if args.broker is None and (args.share != "NO" or args.share_name or args.linger is not None):
        raise LaunchError(EXIT_USAGE, "--share, --share-name and --linger go with --broker")
    if args.linger is not None and not 0 <= args.linger <= 3600:
        raise LaunchError(EXIT_USAGE, f"bad --linger {args.linger} (0..3600 seconds)")
    if args.share == "SAMEAPP" and not args.share_name:
        raise LaunchError(EXIT_USAGE, "--share SAMEAPP needs --share-name")
    if args.broker is not None and (args.allow or not (listens or args.intercept)):
        raise LaunchError(EXIT_USAGE, "--broker takes --listen specs only (its policy decides)")
    root = os.geteuid() == 0
    if not root and args.broker is None:
        raise LaunchError(EXIT_NOT_ROOT, "must be started as root (to start the creator)")
    if not root and (args.user is not None or args.group is not None):
        raise LaunchError(EXIT_NOT_ROOT, "--user and --group need root")
    if root and args.user is None and not args.allow_root:
        raise LaunchError(EXIT_USAGE, "give --user (or --allow-root to run PROGRAM as root)")
    try:
        creds = resolve_credentials(
            args.user if args.user is not None else os.geteuid(), args.group
        )
    except LookupError as e:
        raise LaunchError(EXIT_UNKNOWN_USER, str(e).strip("'\"")) from None
    except ValueError as e:
        raise LaunchError(EXIT_USAGE, str(e)) from None
    if creds.uid == 0 and not args.allow_root:
        raise LaunchError(EXIT_USAGE, "refusing to run PROGRAM as root (use --allow-root)")
    executable = find_program(args.program, environ.get("PATH"))
    return Plan(
        listens=listens,
        listen_specs=tuple(args.listen),
        allow_specs=tuple(args.allow),
        names=names,
        backlog=args.backlog,
        creds=creds,
        executable=executable,
        argv=(args.program, *args.args),
        broker=args.broker,
        intercept=args.intercept,
        share=args.share,
        share_name=args.share_name,
        linger=args.linger,
    )


def _start_creator(p: Plan) -> SocketCreator:
    argv = creator_argv(allow=[*p.listen_specs, *p.allow_specs])
    if p.creds.uid != 0:
        argv += ["--uid", str(p.creds.uid), "--gid", str(p.creds.gid)]
    try:
        return SocketCreator(argv)
    except OSError as e:
        raise LaunchError(EXIT_CREATOR, f"cannot start the creator: {e}") from None


def get_sockets(creator: SocketCreator, p: Plan) -> list[socket.socket]:
    """The --listen sockets from the creator, listening if TCP."""
    try:
        socks = creator.get_sockets(p.listens)
    except SocketCreationError as e:
        raise LaunchError(
            EXIT_REFUSED, f"--listen {e.request}: {e.stage} refused: {e.strerror}"
        ) from None
    except CreatorFatalError as e:
        raise LaunchError(EXIT_CREATOR, f"the creator failed: {e}") from None
    try:
        for sock, request in zip(socks, p.listens, strict=True):
            if request.type == socket.SOCK_STREAM:
                try:
                    sock.listen(p.backlog)
                except OSError as e:
                    raise LaunchError(
                        EXIT_REFUSED, f"--listen {request}: listen refused: {e.strerror}"
                    ) from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def place_fds(sources: Sequence[int]) -> None:
    """Make ``sources[i]`` descriptor 3+i, inheritable; close the originals;
    every other descriptor above 2 becomes close-on-exec."""
    top = SD_LISTEN_FDS_START + len(sources)
    # First out of the way (above every target), then into place: dup2 onto a
    # target can never clobber a source that has not been moved yet.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in sources]
    for fd in sources:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    for fd in open_fds():
        if fd >= top:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the descriptor listdir used, closed by now


def build_environment(
    environ: dict[str, str], p: Plan, channel_fd: int | None, channel_var: str = ENV_FD
) -> dict[str, str]:
    """PROGRAM's environment: ours, with the activation variables replaced."""
    stale = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", ENV_FD, ENV_BROKER_FD)
    env = {k: v for k, v in environ.items() if k not in stale}
    if p.listens:
        env["LISTEN_FDS"] = str(len(p.listens))
        env["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
        env["LISTEN_FDNAMES"] = ":".join(p.names)
    if channel_fd is not None:
        env[channel_var] = str(channel_fd)
    for key in ("USER", "LOGNAME", "HOME"):  # root's would mislead PROGRAM
        env.pop(key, None)
    if p.creds.name is not None:
        env["USER"] = env["LOGNAME"] = p.creds.name
    if p.creds.home is not None:
        env["HOME"] = p.creds.home
    return env


def _ensure_stdio() -> None:
    """Open /dev/null on a closed 0, 1 or 2, so no socket can land there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def launch(p: Plan) -> NoReturn:
    """Steps 2 to 6 (see the module doc); raises LaunchError before the exec."""
    environ = dict(os.environ)
    if p.intercept:
        # Now, as the user who started us: the supervisor runs after the drop,
        # when the interpreter's own library may no longer be readable (it
        # loads dataclasses, which nothing before it needs any more).
        from .intercept import supervisor  # noqa: F401
    if os.geteuid() == 0 and p.creds.uid != 0 and terminal_in_reach():
        try:  # only the child returns: a new session, no terminal to read
            fork_relay(p.creds, _PROG)
        except OSError as e:
            raise LaunchError(EXIT_SYSTEM, str(e)) from None
    if p.broker is not None:
        _launch_with_broker(p, environ)
    creator = _start_creator(p)
    try:
        socks = get_sockets(creator, p)
    except BaseException:
        _stop(creator)
        raise
    try:
        drop_to(p.creds, allow_root=True)  # uid 0 was refused in plan() unless allowed
    except (OSError, ValueError, LookupError) as e:
        for s in socks:
            s.close()
        _stop(creator)
        raise LaunchError(EXIT_SYSTEM, f"cannot drop privileges: {e}") from None
    if p.intercept:
        _supervise(p, environ, socks, creator.detach())
    _exec(p, environ, socks, creator.detach().detach(), ENV_FD)


def _supervise(
    p: Plan,
    environ: dict[str, str],
    socks: list[socket.socket],
    channel: socket.socket | None,
    broker: Broker | None = None,
) -> NoReturn:
    """--intercept (we have dropped already): fork PROGRAM, which installs
    the filter, hands us its listener and execs; we supervise it (see
    :mod:`.intercept.supervisor`) and exit with its status.  PROGRAM gets no
    creator channel (nor, with --broker, broker connection): the
    supervisor's is the only one, and the grants of --listen last as long
    as it does, that is as long as PROGRAM."""
    from .intercept import _seccomp
    from .intercept.supervisor import FORWARDED, Supervisor, forward_signals

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    child = os.fork()
    if child == 0:  # PROGRAM's side: never returns into the caller
        status, message = EXIT_SYSTEM, "cannot start PROGRAM"
        try:
            ours.close()
            if channel is not None:
                channel.close()
            if broker is not None:
                os.close(broker.fileno())  # (the object goes with the exec)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            _seccomp.no_new_privs()
            _seccomp.die_with_parent(parent)
            listener = _seccomp.install_filter()
            theirs.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     struct.pack("@i", listener))])  # fmt: skip
            os.close(listener)
            theirs.close()
            _exec(p, environ, socks, None, ENV_FD)
        except _seccomp.Unsupported as e:
            status, message = EXIT_NO_INTERCEPT, str(e)
        except LaunchError as e:
            status, message = e.status, str(e)
        except BaseException as e:
            message = f"cannot start PROGRAM: {e}"
        try:
            theirs.sendall(message.encode("utf-8", "replace")[:4000])
            os.write(2, f"{_PROG}: {message}\n".encode("utf-8", "replace"))
        finally:
            os._exit(status)
    theirs.close()
    for s in socks:
        s.close()  # PROGRAM has them
    try:
        pidfd = os.pidfd_open(child)
    except (AttributeError, OSError):
        pidfd = -1
    forward_signals(pidfd, child)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    make_non_dumpable()  # PROGRAM, our user, may signal us, not ptrace us
    msg, anc, _flags, _ = ours.recvmsg(4096, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    ours.close()
    fds = [struct.unpack("@i", blob[:4])[0] for _l, _k, blob in anc]
    if msg != b"L" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        _, st = os.waitpid(child, 0)  # it said why on stderr, and exits with its status
        os._exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else EXIT_SYSTEM)
    rules = [specs.parse_rule(spec) for spec in p.allow_specs] + [
        specs.parse_rule(f"{r.protocol}:{_host(r)}:{r.port}") for r in p.listens
    ]
    sup = Supervisor(fds[0], child, channel, rules, prog=_PROG, broker=broker)
    os._exit(sup.run())


def _host(r: Request) -> str:
    return f"[{r.address}]" if r.address.version == 6 else str(r.address)


def _launch_with_broker(p: Plan, environ: dict[str, str]) -> NoReturn:
    """--broker: drop first (if root), so the broker sees U; then as for a creator."""
    from ..broker.client import SocketRefusedError, get_listen_sockets

    assert p.broker is not None
    if os.geteuid() == 0:
        try:
            drop_to(p.creds, allow_root=True)
        except (OSError, ValueError, LookupError) as e:
            raise LaunchError(EXIT_SYSTEM, f"cannot drop privileges: {e}") from None
    try:
        backlog = min(p.backlog, 65535)  # the kernel caps it at somaxconn anyway
        broker, socks = get_listen_sockets(
            p.broker,
            p.listen_specs,
            backlog=backlog,
            share=p.share,
            name=p.share_name,
            linger=p.linger,
            timeout=5.0 if p.intercept else 10.0,  # (the supervisor's, for binds)
        )
    except SocketRefusedError as e:
        raise LaunchError(
            EXIT_REFUSED,
            f"--listen {e.request}: refused by the broker ({e.reason.name.lower()}): {e.strerror}",
        ) from None
    except (CreatorError, OSError) as e:
        raise LaunchError(EXIT_CREATOR, f"the broker at {p.broker} failed: {e}") from None
    if p.intercept:
        if broker.version < 2:
            raise LaunchError(EXIT_CREATOR, f"the broker at {p.broker} is too old for --intercept")
        _supervise(p, environ, socks, None, broker)
    _exec(p, environ, socks, broker.detach(), ENV_BROKER_FD)


def _exec(
    p: Plan,
    environ: dict[str, str],
    socks: list[socket.socket],
    channel: int | None,
    channel_var: str,
) -> NoReturn:
    """Steps 5 and 6: the descriptors into place, then PROGRAM."""
    try:
        sources = [s.detach() for s in socks] + ([] if channel is None else [channel])
        for fd in sources:
            os.set_blocking(fd, True)
        place_fds(sources)
    except OSError as e:
        raise LaunchError(EXIT_SYSTEM, f"cannot arrange descriptors: {e}") from None
    channel_fd = None if channel is None else SD_LISTEN_FDS_START + len(p.listens)
    env = build_environment(environ, p, channel_fd, channel_var)
    # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec.
    ignored = [getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, n)]
    for sig in ignored:
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execve(p.executable, list(p.argv), env)
    except OSError as e:
        for sig in ignored:  # back as they were: our error message may hit a closed pipe
            signal.signal(sig, signal.SIG_IGN)
        status = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_EXEC
        raise LaunchError(status, f"cannot execute {p.executable}: {e.strerror}") from None


def _stop(creator: SocketCreator) -> None:
    """Terminate the creator on a failure path, never masking that failure."""
    try:
        creator.terminate()
    except CreatorError:
        pass  # already reaped (terminate kills it if it misbehaves)


def main(argv: Sequence[str] | None = None) -> int:
    """``sockcreator run``: exec PROGRAM, or return an exit status."""
    plain = _parse_plain(sys.argv[1:] if argv is None else argv)
    args = plain if plain is not None else build_parser().parse_args(argv)
    try:
        _ensure_stdio()
        launch(plan(args, dict(os.environ)))
    except LaunchError as e:
        print(f"{_PROG}: {e}", file=sys.stderr)
        return e.status
