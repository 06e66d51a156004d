"""The least a launcher can do (a floor for ``sockcreator run``): start the
creator on a socketpair, ask it for one socket ('S', TCP IPv4), listen, drop
to a user, set LISTEN_FDS and exec.  stdlib only, no checks beyond the
protocol's; not for use, only for measuring against.

    python floor_launcher.py UID GID PORT PROGRAM [ARGS...]
"""

import array
import os
import socket
import struct
import sys

CREATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "sockcreator",
                       "creator.py")  # fmt: skip


def main() -> None:
    uid, gid, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        os.dup2(theirs.fileno(), 0)
        os.dup2(theirs.fileno(), 1)
        argv = [sys.executable, "-I", "-S", "-B", CREATOR, "--allow", f"tcp:127.0.0.1:{port}",
                "--uid", str(uid), "--gid", str(gid), "--parent", str(os.getppid())]  # fmt: skip
        os.execve(sys.executable, argv, {})
    theirs.close()
    ours.sendall(b"ST4" + struct.pack("!H", port) + socket.inet_aton("127.0.0.1"))
    assert ours.recv(1) == b"S"
    _, anc, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
    fds = array.array("i")
    fds.frombytes(anc[0][2][:4])
    sock = socket.socket(fileno=fds[0])
    sock.listen(128)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.dup2(sock.fileno(), 3)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execvp(sys.argv[4], sys.argv[4:])


if __name__ == "__main__":
    main()
