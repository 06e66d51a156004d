/* IORING_OP_BIND (Linux 6.11+) does not pass through seccomp: this program
 * tries it on 127.0.0.1:PORT and prints the result as the kernel gave it,
 * "OK" or the errno's name, or "UNSUPPORTED" where io_uring or the opcode
 * is not available.  For tests/run/test_intercept.py. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define OP_BIND 56 /* IORING_OP_BIND, not in older headers */

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 80;
    struct io_uring ring;
    if (io_uring_queue_init(4, &ring, 0) != 0) {
        puts("UNSUPPORTED");
        return 0;
    }
    struct io_uring_probe *probe = io_uring_get_probe_ring(&ring);
    if (probe == NULL || !io_uring_opcode_supported(probe, OP_BIND)) {
        puts("UNSUPPORTED");
        return 0;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = OP_BIND;
    sqe->fd = s;
    sqe->addr = (unsigned long)&a;
    sqe->off = sizeof a; /* the address length */
    io_uring_submit(&ring);
    struct io_uring_cqe *cqe;
    io_uring_wait_cqe(&ring, &cqe);
    int res = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
    puts(res == 0 ? "OK" : strerrorname_np(-res));
    return 0;
}
