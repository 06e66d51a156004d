"""The least a Python creator can do (a floor for ``creator.py``): the same
system calls per 'S' request as the creator, and nothing else: no checks,
no policy, no hardening, no 'P' or 'B'.  Not for use, only for measuring
against (``bench_creator.py`` runs it next to creator.py and the C creator).

    python -I -S -B floor_creator.py      (stdin and stdout: one Unix socket)

Per request: recvmsg(1) the command byte (the creator must, for 'B'),
recv(8) type, family, port and an IPv4 address (recv(12) more for IPv6),
socket(), setsockopt(SO_REUSEADDR) (+ IPV6_V6ONLY), bind(), send('S'),
sendmsg() the descriptor on one data byte, close().
"""

import _socket as socket
import os
import sys


def main() -> None:
    rd = socket.socket(fileno=0)
    wr = socket.socket(fileno=1)
    recvmsg, recv, send, sendmsg = rd.recvmsg, rd.recv, wr.send, wr.sendmsg
    inet_ntop, new = socket.inet_ntop, socket.socket
    sol, reuse, v6, v6only = socket.SOL_SOCKET, socket.SO_REUSEADDR, socket.IPPROTO_IPV6, 26
    rights, data = socket.SCM_RIGHTS, [b"\0"]
    cloexec, order = socket.MSG_CMSG_CLOEXEC, sys.byteorder
    while True:
        command = recvmsg(1, 64, cloexec)[0]
        if command != b"S":
            os._exit(0)
        head = recv(8)
        if head[1] == 0x34:  # '4'
            fam, addr = socket.AF_INET, head[4:]
        else:
            fam, addr = socket.AF_INET6, head[4:] + recv(12)
        s = new(fam, socket.SOCK_STREAM if head[0] == 0x54 else socket.SOCK_DGRAM)
        s.setsockopt(sol, reuse, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(v6, v6only, 1)
        s.bind((inet_ntop(fam, addr), int.from_bytes(head[2:4], "big")))
        send(b"S")
        sendmsg(data, [(sol, rights, s.fileno().to_bytes(4, order))])
        s.close()


if __name__ == "__main__":
    main()
