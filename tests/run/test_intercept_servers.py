"""Real servers, unmodified, under ``sockcreator run --intercept``.

Each one runs as ``nobody`` in a fresh network namespace, binds its own
privileged port (every bind() goes through the seccomp supervisor, the
allowed ones are done by the creator on the server's own socket) and answers
a real request over loopback.  nginx (master + 2 workers, reuseport, IPv6,
a reload that binds again), Apache httpd (event MPM), dnsmasq (UDP and TCP),
busybox httpd (a static binary: no libc bind() wrapper to see it), caddy (Go:
raw syscalls), waitress (Python).  A server that is not installed is skipped;
.ci/run installs them all.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    TEST_USERS,
    ensure_user,
    netns_argv,
    requires_linux,
    requires_root,
    socket_in_netns,
)

from sockcreator.client._channel import CREATOR_PATH

pytestmark = [requires_root, requires_linux, pytest.mark.root]

SYSTEM_PYTHON = "/usr/bin/python3"
PAGE = "served unmodified\n"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def need(*paths: str) -> str:
    """The first of ``paths`` that is an executable, or skip the test."""
    for path in paths:
        if os.access(path, os.X_OK):
            return path
    pytest.skip(f"{' or '.join(paths)} missing (.ci/run installs it)")


@pytest.fixture(scope="module")
def user() -> str:
    try:
        return pwd.getpwnam("nobody").pw_name
    except KeyError:
        return ensure_user(TEST_USERS[0]).pw_name


@pytest.fixture
def work(user: str) -> Iterator[Path]:
    """A temporary directory the user owns, with a world-readable www/."""
    d = Path(tempfile.mkdtemp(prefix="sockc-servers-", dir="/tmp"))
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text(PAGE)
    pw = pwd.getpwnam(user)
    for p in (d, d / "www"):
        p.chmod(0o755)
        os.chown(p, pw.pw_uid, pw.pw_gid)
    (d / "www" / "index.html").chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def launcher(user: str, allow: list[str], program: list[str]) -> list[str]:
    rules = [a for spec in allow for a in ("--allow", spec)]
    return [sys.executable, "-m", "sockcreator.cli", "run", "--intercept", "--user", user,
            *rules, "--", *program]  # fmt: skip


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


class Server:
    """``sockcreator run --intercept ... -- PROGRAM`` in a fresh network
    namespace (``unshare -n``, loopback up); its output goes to a file.
    :attr:`proc` is the ``sockcreator run`` process: the supervisor, whose
    child is PROGRAM.  Clients reach it with :meth:`new_socket`."""

    def __init__(
        self,
        work: Path,
        user: str,
        allow: list[str],
        program: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        argv: list[str] | None = None,
    ) -> None:
        """``argv``: the whole command instead (``run --broker``: see
        test_intercept_broker.py); it must leave the netns it starts in."""
        self.log = work / "server.log"
        with self.log.open("wb") as out:
            pw = pwd.getpwnam(user)  # PROGRAM may reopen it (/dev/stderr: Apache's ErrorLog)
            os.fchown(out.fileno(), pw.pw_uid, pw.pw_gid)
            self.proc = subprocess.Popen(
                argv or netns_argv(launcher(user, allow, program)), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**ENV, **(env or {})}, cwd=cwd,
            )  # fmt: skip
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.proc.pid}/ns/net") == ours:  # unshare not yet done
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.01)
        self.netns = os.open(f"/proc/{self.proc.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def program(self) -> int:
        """PROGRAM's pid: the supervisor's child that is not the creator."""
        creator = CREATOR_PATH.encode()
        (pid,) = [p for p in children(self.proc.pid)
                  if creator not in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
        return pid

    def assert_unprivileged(self, user: str) -> None:
        """PROGRAM and every process under it: the user's, no capability."""
        uid = pwd.getpwnam(user).pw_uid
        todo, seen = [self.program], []
        while todo:
            pid = todo.pop()
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            assert set(fields["Uid"].split()) == {str(uid)}, (pid, fields["Uid"])
            assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 0, (pid, status)
            assert fields["Seccomp"].strip() == "2", (pid, fields["Seccomp"])  # the filter
            seen.append(pid)
            todo.extend(children(pid))
        assert seen

    def new_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket in the server's network namespace (made by a thread that
        entered it: setns() changes the calling thread only)."""
        return socket_in_netns(self.netns, family, kind)

    def connect(self, host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """Connected once the server answers (it is still starting)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + 20
        while True:
            sock = self.new_socket(family, kind)
            sock.settimeout(10)
            try:
                sock.connect((host, port))
                return sock
            except OSError as e:
                sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{host}:{port}: {e}\n{self.output()}") from None
                time.sleep(0.05)

    def get(self, host: str, port: int = 80, path: str = "/index.html") -> str:
        """An HTTP/1.0 GET: the whole response."""
        with self.connect(host, port) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode("utf-8", "replace")

    def stop(self) -> int:
        """SIGTERM (forwarded to PROGRAM); the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not stop on SIGTERM:\n{self.output()}") from None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.netns)


def assert_page(response: str) -> None:
    assert response.startswith("HTTP/1.") and " 200 " in response.split("\r\n", 1)[0], response
    assert PAGE in response, response


# --- nginx -------------------------------------------------------------------

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        {listen}
        root {d}/www;
    }}
}}
"""
NGINX_LISTEN = "listen 127.0.0.1:80 reuseport; listen [::]:80 ipv6only=on;"
# [::]:80 needs 0.0.0.0:80 too: the creator checks an IPv6 wildcard as if
# V6ONLY could be off (it cannot see that nginx set it).
NGINX_ALLOW = ["tcp:127.0.0.1:80", "tcp:[::]:80", "tcp:0.0.0.0:80", "tcp:127.0.0.1:443"]


def nginx(work: Path, listen: str) -> list[str]:
    exe = need("/usr/sbin/nginx")
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=work, listen=listen))
    return [exe, "-p", str(work), "-e", "stderr", "-c", str(conf)]


def test_nginx_master_workers_reuseport_ipv6_and_reload(work: Path, user: str) -> None:
    with Server(work, user, NGINX_ALLOW, nginx(work, NGINX_LISTEN)) as server:
        assert_page(server.get("127.0.0.1"))
        assert_page(server.get("::1"))
        server.assert_unprivileged(user)
        master = server.program
        assert int((work / "nginx.pid").read_text()) == master
        workers = children(master)
        assert len(workers) == 2, server.output()
        assert all(os.stat(f"/proc/{p}").st_uid == pwd.getpwnam(user).pw_uid for p in workers)

        # A reload with one more listen: the master (as the user) binds
        # 127.0.0.1:443 now, keeps the sockets it has, and starts new workers.
        (work / "nginx.conf").write_text(
            NGINX_CONF.format(d=work, listen=NGINX_LISTEN + " listen 127.0.0.1:443;")
        )
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            now = children(master)
            if len(now) == 2 and not now & workers:
                break
            assert time.monotonic() < deadline, (now, workers, server.output())
            time.sleep(0.05)
        assert_page(server.get("127.0.0.1"))
        assert_page(server.get("::1"))
        assert_page(server.get("127.0.0.1", 443))
        server.assert_unprivileged(user)
        assert server.program == master
        assert server.stop() == 0, server.output()  # nginx's own fast shutdown
    out = server.output()
    assert "denied" not in out and "Permission denied" not in out, out


def test_nginx_denied_port_is_its_own_eacces(work: Path, user: str) -> None:
    program = nginx(work, "listen 127.0.0.1:80; listen 127.0.0.1:81;")
    done = subprocess.run(netns_argv(launcher(user, ["tcp:127.0.0.1:80"], program)),
                          capture_output=True, text=True, timeout=60, env=ENV,
                          stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    assert done.returncode == 1, done
    assert "bind() to 127.0.0.1:81 failed (13: Permission denied)" in done.stderr, done.stderr
    assert "denied pid" in done.stderr and "127.0.0.1:81" in done.stderr


# --- Apache httpd --------------------------------------------------------------

APACHE_CONF = """
ServerRoot {d}
ServerName localhost
Listen 127.0.0.1:80
PidFile {d}/httpd.pid
DefaultRuntimeDir {d}
ErrorLog /dev/stderr
LogLevel notice
LoadModule mpm_event_module {m}/mod_mpm_event.so
LoadModule authz_core_module {m}/mod_authz_core.so
StartServers 1
DocumentRoot {d}/www
<Directory {d}/www>
    Require all granted
</Directory>
"""


def test_apache_httpd(work: Path, user: str) -> None:
    exe = need("/usr/sbin/apache2", "/usr/sbin/httpd")
    conf = work / "httpd.conf"
    conf.write_text(APACHE_CONF.format(d=work, m="/usr/lib/apache2/modules"))
    with Server(work, user, ["tcp:127.0.0.1:80"], [exe, "-f", str(conf), "-DFOREGROUND"]) as server:
        assert_page(server.get("127.0.0.1"))
        server.assert_unprivileged(user)
        assert server.stop() == 0, server.output()


# --- dnsmasq -------------------------------------------------------------------


def dns_query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)
    )


def _skip_name(msg: bytes, i: int) -> int:
    while True:
        n = msg[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n


def dns_a_records(msg: bytes, qid: int) -> list[str]:
    rid, _flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", msg)
    assert rid == qid, msg
    i = 12
    for _ in range(qd):
        i = _skip_name(msg, i) + 4
    found = []
    for _ in range(an):
        i = _skip_name(msg, i)
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", msg, i)
        i += 10
        if rtype == 1 and rdlen == 4:
            found.append(socket.inet_ntoa(msg[i : i + 4]))
        i += rdlen
    return found


def dnsmasq(work: Path, user: str) -> list[str]:
    """dnsmasq on 127.0.0.1:53, answering test.example with 192.0.2.7."""
    exe = need("/usr/sbin/dnsmasq")
    return [exe, "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--port=53",
            "--address=/test.example/192.0.2.7", f"--pid-file={work}/dnsmasq.pid",
            f"--user={user}", "--log-facility=-"]  # fmt: skip


def assert_dnsmasq_answers(server: Server) -> None:
    """An A query over UDP, then one over TCP, each answered 192.0.2.7."""
    with server.connect("127.0.0.1", 53, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.5)
        deadline = time.monotonic() + 20
        while True:  # a connected UDP socket: ECONNREFUSED until it listens
            try:
                udp.send(dns_query("www.test.example", 0x1234))
                answer = udp.recv(4096)
                break
            except OSError:
                assert server.proc.poll() is None, server.output()
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.05)
    assert dns_a_records(answer, 0x1234) == ["192.0.2.7"], answer
    with server.connect("127.0.0.1", 53) as tcp:
        query = dns_query("test.example", 0x4321)
        tcp.sendall(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
            chunk = tcp.recv(4096)
            assert chunk, data
            data += chunk
    assert dns_a_records(data[2:], 0x4321) == ["192.0.2.7"], data


def test_dnsmasq_udp_and_tcp(work: Path, user: str) -> None:
    with Server(work, user, ["*:127.0.0.1:53"], dnsmasq(work, user)) as server:
        assert_dnsmasq_answers(server)
        server.assert_unprivileged(user)
        assert server.stop() == 0, server.output()  # "exiting on receipt of SIGTERM"
    assert "denied" not in server.output(), server.output()


# --- busybox httpd (static) ------------------------------------------------------


def is_static(path: str) -> bool:
    """An x86_64/aarch64 ELF with no PT_INTERP: no dynamic loader, no libc.so."""
    with open(path, "rb") as f:
        elf = f.read(64)
        if elf[:5] != b"\x7fELF\x02":
            return False
        (phoff,) = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


def test_busybox_httpd_static_binary(work: Path, user: str) -> None:
    exe = need("/bin/busybox", "/usr/bin/busybox")
    if not is_static(exe):
        pytest.skip(f"{exe} is not static (Debian's busybox-static is)")
    program = [exe, "httpd", "-f", "-p", "127.0.0.1:80", "-h", str(work / "www")]
    with Server(work, user, ["tcp:127.0.0.1:80"], program) as server:
        assert_page(server.get("127.0.0.1"))
        server.assert_unprivileged(user)
        assert server.stop() == 128 + signal.SIGTERM, server.output()


# --- caddy (Go) -----------------------------------------------------------------


def test_caddy_file_server(work: Path, user: str) -> None:
    exe = need("/usr/bin/caddy")
    env = {"XDG_CONFIG_HOME": str(work / "config"), "XDG_DATA_HOME": str(work / "data")}
    program = [exe, "file-server", "--listen", "127.0.0.1:80", "--root", str(work / "www")]
    with Server(work, user, ["tcp:127.0.0.1:80"], program, env=env, cwd=work) as server:
        assert_page(server.get("127.0.0.1"))
        server.assert_unprivileged(user)
        assert server.stop() == 0, server.output()  # caddy's graceful shutdown
    assert "denied" not in server.output(), server.output()


# --- waitress (Python, Debian's python3) -------------------------------------------

WSGI_APP = """
def application(environ, start_response):
    body = {page!r}.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.fixture(scope="module")
def waitress_serve() -> Iterator[str]:
    """Debian's waitress-serve (python3-waitress), else one in a world-readable
    venv made from /usr/bin/python3 (the default python3 may sit under /root)."""
    debian = "/usr/bin/waitress-serve"
    importable = [SYSTEM_PYTHON, "-c", "import waitress"]
    if (
        os.access(debian, os.X_OK)
        and subprocess.run(importable, capture_output=True).returncode == 0
    ):
        yield debian
        return
    need(SYSTEM_PYTHON)
    d = tempfile.mkdtemp(prefix="sockc-waitress-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        made = subprocess.run(f"{SYSTEM_PYTHON} -m venv {d}/venv && {d}/venv/bin/pip install -q "
                              "waitress", shell=True, capture_output=True, text=True)  # fmt: skip
        if made.returncode != 0:
            pytest.skip(f"no python3-waitress and no venv with waitress: {made.stderr[-500:]}")
        yield f"{d}/venv/bin/waitress-serve"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_waitress_serve(work: Path, user: str, waitress_serve: str) -> None:
    (work / "app.py").write_text(WSGI_APP.format(page=PAGE))
    (work / "app.py").chmod(0o644)
    program = [waitress_serve, "--listen=127.0.0.1:80", "app:application"]
    with Server(work, user, ["tcp:127.0.0.1:80"], program, cwd=work) as server:
        assert_page(server.get("127.0.0.1"))
        server.assert_unprivileged(user)
        assert server.stop() == 128 + signal.SIGTERM, server.output()
