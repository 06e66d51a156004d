"""The least a broker client can do (a floor for ``sockcreator run --broker``):
drop to a user, connect to the broker, say hello, ask for one listening TCP
socket, put it on descriptor 3, set LISTEN_FDS and exec.  stdlib only, no
checks beyond the framing; not for use, only for measuring against.

    python floor_broker_client.py UID GID SOCKET_PATH PORT PROGRAM [ARGS...]
"""

import os
import socket
import struct
import sys


def main() -> None:
    uid, gid, path, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    # hello (version 2), then Q: id 1, TCP, IPv4, port, share NO, no flags,
    # backlog 128, no name, 127.0.0.1
    body = struct.pack("!I1s1sH1sBIB", 1, b"T", b"4", port, b"N", 0, 128, 0)
    body += socket.inet_aton("127.0.0.1")
    conn.sendall(b"H\x00\x01\x02" + b"Q" + struct.pack("!H", len(body)) + body)
    head = conn.recv(3)
    conn.recv(struct.unpack("!H", head[1:])[0])  # the hello answer
    data, anc, _, _ = conn.recvmsg(3 + 255, socket.CMSG_SPACE(4))
    assert data[:1] == b"G" and anc, data
    fd = struct.unpack("@i", anc[0][2][:4])[0]
    os.dup2(fd, 3)
    os.set_inheritable(3, True)
    os.dup2(conn.fileno(), 4)  # the grant lasts as long as the connection
    os.set_inheritable(4, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execvp(sys.argv[5], sys.argv[5:])


if __name__ == "__main__":
    main()
