"""What ``sockcreator serve`` adds around the server as a daemon: the
service manager's notifications (:mod:`._notify`), SIGHUP's reload of the
policy, and the listening socket a starter may pass (``LISTEN_FDS``).  See
docs/broker.md, "Under a service manager" and "Reloading the policy"."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import grp
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from .. import activation
from ..client._errors import CreatorFatalError
from ..client._protocol import Request, make_request
from . import _notify
from ._audit import describe
from ._creator import AdoptedCreatorChannel, CreatorChannel, Outcome
from ._factory import Factory, FactoryError
from ._server import BrokerServer
from .policy import Policy, PolicyError, changes, outside, parse_policy

__all__ = ["Daemon", "take_environment"]

_MAX_POLICY = 1 << 20  # bytes read of a policy file at a reload
_STATUS_EVERY = 5.0  # seconds between STATUS= updates (sent only when they change)


def _probe(allow: list[str] | None) -> Request:
    """What to ask the creator before READY=1: any answer proves it hardened
    (it reads no request before).  The least privileged question is one it
    refuses: UDP on 127.0.0.1, on the first port outside every spec of its
    allow-list (it binds nothing, and logs one "denied" line).  Only a
    creator allowed every port gets UDP 127.0.0.1 port 0 (an ephemeral
    socket, closed at once)."""
    free = 0
    ports = (spec.rsplit(":", 1)[1].partition("-") for spec in allow or ["*:*:0-65535"])
    for lo, hi in sorted((int(a), int(b or a)) for a, _, b in ports):
        if lo > free:
            break
        free = max(free, hi + 1)
    return make_request("udp", "127.0.0.1", free if free <= 65535 else 0)


class Daemon:
    """What ``serve`` adds around the server: the service manager's
    notifications (:mod:`._notify`), SIGHUP's reload, and the stop."""

    def __init__(
        self,
        policy_path: str,
        policy_dir: int,
        server: BrokerServer,
        policy: Policy,
        allow: list[str] | None,
        notifier: _notify.Notifier,
        factory: Factory | None = None,
    ) -> None:
        self.policy_path, self.server, self.policy, self.allow = policy_path, server, policy, allow
        self.policy_dir = policy_dir
        self.notifier = notifier
        self.ready = False
        #: starts creators for widening reloads (None: not root at start)
        self.factory = factory
        #: what the creator in service calls when it dies (serve: stop)
        self.on_creator_fatal: Callable[[CreatorFatalError], None] | None = None
        self._reloading: asyncio.Task[None] | None = None  # a widening reload under way
        self._again = False  # a SIGHUP came during it
        self._retiring: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._last_status = ""

    def status_text(self) -> str:
        c, s, g = self.server.counts()
        bound, refused = self.server.binds
        text = f"{c} connections, {s} sockets, {g} grants"
        return text + (f", {bound} binds ({refused} refused)" if bound or refused else "")

    def _notify(self, message: bytes) -> None:
        if self.notifier.enabled and not self.notifier.send(message) and self.notifier.error:
            self.server.audit.log("error", what="notify", error=self.notifier.error)

    def start(self, creator: CreatorChannel) -> None:
        """Ask the creator the probe; READY=1 comes with its answer."""
        probe = _probe(self.allow)

        def answered(outcome: Outcome) -> None:
            if isinstance(outcome, socket.socket):
                outcome.close()
                answer = "socket"
            elif isinstance(outcome, CreatorFatalError):
                return  # on_fatal stops the broker: never ready
            else:
                answer = errno.errorcode.get(outcome.errno or 0, str(outcome.errno))
            self.ready = True
            self.server.audit.log("ready", probe=describe(probe, None), answer=answer)
            self.server.audit.flush()  # the line before the news, as for every answer
            self._notify(_notify.ready(self.status_text()))
            self._schedule()

        creator.request(probe, answered)
        creator.push()

    def _schedule(self) -> None:
        if not self.notifier.enabled:
            return
        usec = self.notifier.watchdog_usec
        if usec is not None:
            self._every("watchdog", usec / 2e6, lambda: self._notify(_notify.watchdog()))
        self._every("status", _STATUS_EVERY, self._refresh_status)

    def _every(self, name: str, seconds: float, action: Callable[[], None]) -> None:
        loop = self.server.loop

        def tick() -> None:
            action()
            if self.notifier.enabled:  # (a failed send ended notifications)
                self._timers[name] = loop.call_later(seconds, tick)

        self._timers[name] = loop.call_later(seconds, tick)

    def _refresh_status(self) -> None:
        text = self.status_text()
        if text != self._last_status:
            self._last_status = text
            self._notify(_notify.status(text))

    def stop(self, status: int) -> None:
        self._notify(_notify.stopping(self.status_text()))
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        self.server.stop(status)

    def _load(self) -> Policy:
        """The policy file again, by its name in the directory it was in at
        start (a descriptor kept from before the drop: the way there may be
        closed to ``--user``; the file itself must be readable by it)."""
        name = os.path.basename(self.policy_path)
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.policy_dir)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise PolicyError("it is not a regular file")
            return parse_policy(f.read(_MAX_POLICY + 1)[:_MAX_POLICY].decode("utf-8"))

    def reload(self) -> None:
        """SIGHUP: the policy file again (see docs/broker.md, "Reloading")."""
        if self._reloading is not None:  # one at a time: this one comes next
            self._again = True
            return
        self._notify(_notify.reloading())
        path = self.policy_path
        record: dict[str, Any] = {"policy": os.path.abspath(path)}
        try:
            new = self._load()
            if not new.rules:
                raise PolicyError("it allows nothing")
        except (OSError, ValueError) as e:  # PolicyError, and text that is not UTF-8
            text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            record.update(result="error", error=f"{text} (the old policy stays)")
        else:
            added, removed = changes(self.policy, new)
            record.update(rules=len(new.rules), added=added, removed=removed)
            beyond = outside(self.allow, new.creator_allow())
            if beyond and self.factory is not None:
                record.update(outside=beyond)
                self._reloading = self.server.loop.create_task(self._widen(new, record))
                return
            if beyond:
                record.update(
                    result="refused",
                    error="needs a restart: the creator's allow-list is fixed at start "
                    "(the old policy stays)",
                    outside=beyond,
                )
            else:
                self.server.set_policy(new)
                self.policy = new
                record.update(result="ok")
        self._reloaded(record)

    def _reloaded(self, record: dict[str, Any]) -> None:
        self.server.audit.log("reload", **record)
        self.server.audit.flush()
        self._notify(_notify.ready(self.status_text()))
        if self._again:
            self._again = False
            self.server.loop.call_soon(self.reload)

    async def _widen(self, new: Policy, record: dict[str, Any]) -> None:
        """A policy beyond the creator's fence: a new creator from the
        factory, probed, then switched to; the old one is retired."""
        assert self.factory is not None
        channel: CreatorChannel | None = None
        try:
            try:
                spawned = await self.factory.spawn()
            except FactoryError as e:
                problem: str | None = f"no new creator: {e}"
            else:
                channel = AdoptedCreatorChannel(spawned.sock, spawned.pid)
                channel.on_fatal = lambda e: None  # (its waiters hear it; we are one)
                # The factory read the file itself: it must allow what we read.
                if outside(spawned.allow, new.creator_allow()):
                    problem = "the policy file changed during the reload: send SIGHUP again"
                else:
                    problem = await self._probe_new(channel, spawned.allow)
            if problem is not None:
                record.update(result="error", error=f"{problem} (the old policy stays)")
            else:
                assert channel is not None
                old = self.server.use_creator(channel)
                channel.on_fatal = self.on_creator_fatal
                self.server.set_policy(new)
                self.policy, self.allow = new, spawned.allow
                record.update(
                    result="ok", creator={"from": old.pid, "to": channel.pid}, allow=spawned.allow
                )
                channel = old  # the one to retire now
        finally:
            self._reloading = None
            if channel is not None:  # the old one, or a new one not switched to
                self.retire(channel)
        self._reloaded(record)

    async def _probe_new(self, channel: CreatorChannel, allow: list[str] | None) -> str | None:
        """As at start: any answer proves the new creator hardened."""
        answer: asyncio.Future[Outcome] = self.server.loop.create_future()

        def answered(outcome: Outcome) -> None:
            if not answer.done():
                answer.set_result(outcome)
            elif isinstance(outcome, socket.socket):
                outcome.close()

        channel.request(_probe(allow), answered)
        outcome = await answer
        if isinstance(outcome, socket.socket):
            outcome.close()
        elif isinstance(outcome, CreatorFatalError):
            return f"the new creator failed its first request: {outcome}"
        return None

    def retire(self, channel: CreatorChannel) -> None:
        """'T' to ``channel`` after what it has in flight, in the background;
        its death on the way stops nothing (one audit line)."""
        pid = channel.pid

        def died(e: CreatorFatalError) -> None:
            self.server.audit.log("error", what="retiring creator", pid=pid, error=str(e))

        async def retiring() -> None:
            status = await channel.terminate()
            self.server.audit.log("retire", what="creator", pid=pid, status=status)

        channel.on_fatal = died
        channel.auto_push = True
        task = self.server.loop.create_task(retiring())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """At the stop: a widening under way is abandoned; the creator in
        service and any retiring one get 'T'; the factory gets EOF."""
        if self._reloading is not None:
            self._reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloading
        creator = self.server.creator
        creator.on_fatal = None
        await creator.terminate()
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.factory is not None:
            await self.factory.close()


_MAX_POLICY = 1 << 20  # bytes read of a policy file at a reload
_STATUS_EVERY = 5.0  # seconds between STATUS= updates (sent only when they change)


def take_inherited(args: argparse.Namespace) -> str | None:
    """Take the socket the starter passed (LISTEN_FDS), if any, into
    ``args.inherited`` (and its path into ``args.socket_path``); a message
    if it cannot be used (exit 4)."""
    args.inherited, args.socket_path = None, None
    try:
        passed = activation.listen_sockets()
    except ValueError as e:
        return f"the socket passed by the starter (LISTEN_FDS): {e}"
    if not passed:
        return None
    if len(passed) != 1:
        for _, sock in passed:
            sock.close()
        return (
            f"the starter passed {len(passed)} descriptors (LISTEN_FDS); the broker takes "
            "exactly one: a listening AF_UNIX stream socket"
        )
    name, sock = passed[0]
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        bound = sock.getsockname() if sock.family == socket.AF_UNIX else None
    except OSError as e:
        sock.close()
        return f"the socket passed by the starter (LISTEN_FDS, {name}): {e}"
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        what = f"{sock.family.name} {sock.type.name}{'' if listening else ', not listening'}"
        sock.close()
        return (
            f"the socket passed by the starter (LISTEN_FDS, descriptor "
            f"{activation.SD_LISTEN_FDS_START}) is {what}: the broker needs a listening "
            "AF_UNIX stream socket (ListenStream=/path in the .socket unit)"
        )
    path = bound if isinstance(bound, str) else None
    shown = path if path else f"@{bound[1:].decode(errors='replace')}" if bound else "(unnamed)"
    problem = None
    if args.socket is not None and (path is None or os.path.abspath(args.socket) != path):
        problem = f"--socket {args.socket} is not the inherited socket, which is {shown}"
    elif (args.mode is not None or args.group) and path is None:
        problem = f"--mode/--group cannot apply to the inherited socket {shown} (no file)"
    elif path is not None and (args.mode is not None or args.group):
        try:
            st = os.stat(path)
            want_gid = grp.getgrnam(args.group).gr_gid if args.group else st.st_gid
        except (OSError, LookupError):
            sock.close()
            raise
        # only compared: the broker changes nothing it did not make
        if (args.mode is not None and st.st_mode & 0o777 != args.mode) or st.st_gid != want_gid:
            problem = (
                f"the inherited socket {path} has mode {st.st_mode & 0o777:04o} and gid "
                f"{st.st_gid}, not what --mode/--group ask: set SocketMode=/SocketGroup= "
                "in the .socket unit to match, or drop the options"
            )
    if problem is not None:
        sock.close()
        return problem
    args.inherited, args.socket_path = sock, shown
    return None


def take_environment(args: argparse.Namespace) -> tuple[str, str] | None:
    """What the starter passed: ``NOTIFY_SOCKET`` and the rest into
    ``args.notifier``, a listening socket into ``args.inherited``; every
    variable is removed from the environment, so that no child (the
    creator) sees one.  ``("config" | "socket", message)`` if they cannot
    be used (nothing is left open then)."""
    try:
        args.notifier = _notify.from_environment()
    except (OSError, ValueError) as e:
        args.inherited = None
        activation.listen_fds()  # (unsets LISTEN_*; the descriptors stay as passed)
        return "config", f"the service manager's notification socket: {e}"
    try:
        problem = take_inherited(args)
    except (OSError, LookupError) as e:
        problem = f"the inherited socket: {e}"
    if problem is not None:
        args.notifier.close()
        return "socket", problem
    if args.inherited is None and args.socket is None:
        args.notifier.close()
        return "config", "give --socket PATH, or start the broker with one (LISTEN_FDS)"
    return None
