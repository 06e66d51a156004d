"""The broker's link to its creator (:class:`sockcreator.broker._creator.CreatorChannel`).

Real creators (ours, unhardened, as this user) and scripted fake ones in
subprocesses (:func:`fakepeer.fake_creator_command`), on both event loops the
broker can run on.  What is checked here is the channel's own contract:
answers in order to plain callbacks, never called before ``request`` returns;
a request to an idle creator goes out at once, requests made while answers
are due wait for one write; the silence watchdog (fatal only after
``timeout`` seconds with answers due and none coming, however long the
channel lives); and a dead creator failing every waiter once.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from fakepeer import fake_creator_command

from sockcreator.broker._creator import CreatorChannel, Outcome
from sockcreator.client._channel import creator_argv
from sockcreator.client._errors import CreatorFatalError, SocketCreationError
from sockcreator.client._protocol import make_request

LOOPS = ["asyncio", "uvloop"]

# A fake creator that serves real sockets until 'T' or EOF (then exits 0),
# each answer after ``delay`` seconds.
SERVE = """
while sock.recv(1, socket.MSG_PEEK) not in (b"T", b""):
    time.sleep({delay})
    serve_one()
"""


def run_on(loop: str, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop == "uvloop":
        if importlib.util.find_spec("uvloop") is None:
            pytest.skip("uvloop is not installed (the 'fast' and 'test' extras have it)")
        import uvloop

        uvloop.run(asyncio.wait_for(coro(), 30))
    else:
        asyncio.run(asyncio.wait_for(coro(), 30))


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Collector:
    """Callbacks that record their outcomes (and whether they ran too early)."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.returned = False  # set once request() has returned
        self.early = False
        self.done = asyncio.Event()
        self.want = 0

    def callback(self) -> Callable[[Outcome], None]:
        self.want += 1

        def got(outcome: Outcome) -> None:
            if not self.returned:
                self.early = True
            self.outcomes.append(outcome)
            if len(self.outcomes) == self.want:
                self.done.set()

        return got

    def close(self) -> None:
        for o in self.outcomes:
            if isinstance(o, socket.socket):
                o.close()


async def ask(ch: CreatorChannel, n: int) -> Collector:
    """``n`` requests for UDP sockets on free ports of 127.0.0.1; their outcomes."""
    c = Collector()
    for _ in range(n):
        ch.request(make_request("udp", "127.0.0.1", udp_port()), c.callback())
    c.returned = True
    await c.done.wait()
    return c


@pytest.mark.parametrize("loop", LOOPS)
def test_real_creator_answers_in_order_never_before_request_returns(loop: str) -> None:
    async def main() -> None:
        ch = CreatorChannel(creator_argv(harden=False), timeout=10)
        ch.start()
        ports = [udp_port() for _ in range(3)]
        c = Collector()
        for p in ports:
            ch.request(make_request("udp", "127.0.0.1", p), c.callback())
        ch.request(make_request("udp", "192.0.2.1", ports[0]), c.callback())  # EADDRNOTAVAIL
        c.returned = True
        await c.done.wait()
        try:
            assert not c.early
            assert [o.getsockname()[1] for o in c.outcomes[:3]] == ports  # type: ignore[union-attr]
            err = c.outcomes[3]
            assert isinstance(err, SocketCreationError) and err.stage == "bind", err
            assert err.errno == errno.EADDRNOTAVAIL
        finally:
            c.close()
        assert await ch.terminate() == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_creator_gets_a_request_at_once_busy_one_in_one_write(loop: str) -> None:
    # The channel says what is still unsent right after each request(),
    # before the loop turns.
    async def main() -> None:
        ch = CreatorChannel(fake_creator_command(SERVE.format(delay=0)), timeout=10)
        ch.auto_push = False  # as the broker runs it: pushed once per turn
        ch.start()
        c = Collector()
        ch.request(make_request("udp", "127.0.0.1", udp_port()), c.callback())
        assert not ch.unsent  # idle: sent already
        ch.request(make_request("udp", "127.0.0.1", udp_port()), c.callback())
        ch.request(make_request("udp", "127.0.0.1", udp_port()), c.callback())
        assert ch.unsent  # answers due: these wait for push()
        ch.push()
        assert not ch.unsent
        c.returned = True
        await c.done.wait()
        try:
            assert not c.early
            assert all(isinstance(o, socket.socket) for o in c.outcomes), c.outcomes
        finally:
            c.close()
        assert await ch.terminate() == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_silent_creator_is_fatal_after_the_timeout_and_not_before(loop: str) -> None:
    async def main() -> None:
        ch = CreatorChannel(fake_creator_command("read(9); time.sleep(30)"), timeout=0.4)
        fatal: list[CreatorFatalError] = []
        ch.on_fatal = fatal.append
        ch.start()
        t0 = time.monotonic()
        c = await ask(ch, 1)
        waited = time.monotonic() - t0
        (err,) = c.outcomes
        assert isinstance(err, CreatorFatalError) and "within 0.4s" in str(err)
        # (an event loop's clock is read once per turn, and uvloop's in whole
        # milliseconds: the deadline may come a turn's length early)
        assert 0.35 <= waited < 5, waited
        assert len(fatal) == 1
        assert ch.pid is not None
        await ch.terminate()  # reaps the killed creator

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_slow_but_steady_creator_outlives_the_timeout(loop: str) -> None:
    # Each answer takes 0.25 s, the timeout is 0.4 s, and six answers take
    # 1.5 s in all: the deadline moves with every answer.
    async def main() -> None:
        ch = CreatorChannel(fake_creator_command(SERVE.format(delay=0.25)), timeout=0.4)
        ch.start()
        t0 = time.monotonic()
        c = await ask(ch, 6)
        try:
            assert time.monotonic() - t0 > 0.4 * 2
            assert all(isinstance(o, socket.socket) for o in c.outcomes), c.outcomes
        finally:
            c.close()
        # Idle for longer than the timeout: no answers due, nothing is fatal.
        await asyncio.sleep(0.6)
        c2 = await ask(ch, 1)
        c2.close()
        assert isinstance(c2.outcomes[0], socket.socket), c2.outcomes
        assert await ch.terminate() == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_dead_creator_fails_every_waiter_once(loop: str) -> None:
    async def main() -> None:
        ch = CreatorChannel(fake_creator_command("serve_one(); read(3); os._exit(3)"), timeout=5)
        fatal: list[CreatorFatalError] = []
        ch.on_fatal = fatal.append
        ch.start()
        c = await ask(ch, 4)
        try:
            assert isinstance(c.outcomes[0], socket.socket)
            assert all(isinstance(o, CreatorFatalError) for o in c.outcomes[1:]), c.outcomes
            assert len(fatal) == 1
        finally:
            c.close()
        later = await ask(ch, 1)
        assert isinstance(later.outcomes[0], CreatorFatalError) and not later.early
        assert await ch.terminate() == 3

    run_on(loop, main)


# A creator that answers one request with a real socket but sends the
# descriptor with the wrong byte: with the 'S' ("on S"), or with 'S' and its
# data byte in one message ("on both": BIND 10's clients lose it, as they read
# the 'S' with no room for descriptors).  Both are violations.
MISPLACED = """
head, addr = read(5), read(4)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int.from_bytes(head[3:5], "big")))
if {how!r} == "on S":
    send_fds(b"S", [s.fileno()])
    send(b"\\0")
else:
    send_fds(b"S\\0", [s.fileno()])
read(1)
"""


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("how", ["on S", "on both"])
def test_descriptor_must_come_with_the_answers_data_byte(loop: str, how: str) -> None:
    async def main() -> None:
        ch = CreatorChannel(fake_creator_command(MISPLACED.format(how=how)), timeout=5)
        fatal: list[CreatorFatalError] = []
        ch.on_fatal = fatal.append
        ch.start()
        c = await ask(ch, 1)
        (outcome,) = c.outcomes
        assert isinstance(outcome, CreatorFatalError), outcome
        assert "descriptor" in str(outcome) and fatal == [outcome]
        await ch.terminate()  # reaps the killed creator

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("when", ["before the answer", "after the answer, before resuming"])
def test_cancelled_get_loses_no_socket(loop: str, when: str) -> None:
    """``get`` cancelled while its answer is due, or once the socket was set as
    its future's result but before it resumed: the socket is closed."""

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    async def main() -> None:
        ch = CreatorChannel(creator_argv(harden=False), timeout=10)
        ch.start()
        base = fds()
        task = asyncio.get_running_loop().create_task(ch.get(make_request("udp", "127.0.0.1", 0)))
        await asyncio.sleep(0)  # get() has queued its callback
        if when == "before the answer":
            task.cancel()
        else:
            inner = ch._waiters[-1]

            def then_cancel(outcome: Outcome) -> None:
                inner(outcome)  # sets the socket as the result
                task.cancel()  # before the task resumes

            ch._waiters[-1] = then_cancel
        with pytest.raises(asyncio.CancelledError):
            await task
        (await ch.get(make_request("udp", "127.0.0.1", 0))).close()  # answers in order
        assert fds() == base
        assert await ch.terminate() == 0

    run_on(loop, main)


def test_a_creator_we_may_not_signal_is_ended_by_eof() -> None:
    """The broker's creator runs as a user of its own, so the broker may not
    kill it: a fatal error must still reach ``on_fatal`` (found by CI: a
    creator killed from outside was not reaped yet, ``kill()`` raised EPERM in
    the reader callback, and the broker never stopped).  Here a fake creator
    of another uid breaks the protocol and then stays alive; the channel is
    run by a forked child that has dropped to yet another uid."""
    from conftest import IS_ROOT, ensure_user

    if not IS_ROOT:
        pytest.skip("needs root to run the two sides as two users")
    channel_user, creator_user = ensure_user("sockc-broker"), ensure_user("sockc-creator")
    fake = ["/usr/bin/setpriv", f"--reuid={creator_user.pw_uid}",
            f"--regid={creator_user.pw_gid}", "--clear-groups", "/usr/bin/python3", "-c",
            "import os, time\nos.read(0, 64)\nos.write(1, b'Z')\ntime.sleep(60)"]  # fmt: skip
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the broker's side
        try:
            os.close(r)

            async def main() -> str:
                ch = CreatorChannel(fake, timeout=0.5)
                ch.start()
                fatal: list[CreatorFatalError] = []
                ch.on_fatal = fatal.append
                os.setresgid(channel_user.pw_gid, channel_user.pw_gid, channel_user.pw_gid)
                os.setgroups([])
                os.setresuid(channel_user.pw_uid, channel_user.pw_uid, channel_user.pw_uid)
                got: list[Outcome] = []
                ch.request(make_request("udp", "127.0.0.1", 0), got.append)
                for _ in range(400):
                    if fatal:
                        break
                    await asyncio.sleep(0.01)
                status = await ch.terminate()  # returns: it does not hang on the creator
                ok = bool(fatal) and isinstance(got[0], CreatorFatalError) and status is None
                return "ok" if ok else f"fatal={fatal} got={got} status={status}"

            os.write(w, asyncio.run(main()).encode())
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    assert result == "ok", result
