/*
 * A stand-in for BIND 10's C++ b10-sockcreator, written from the protocol
 * description in the seed text only, for the compatibility tests.
 *
 * It reads requests from fd 0 and writes answers to fd 1 (both the same
 * Unix stream socket) with fixed-length reads:
 *
 *   'T'                                   exit(0), nothing written
 *   'S' 'U'|'T' '4'|'6' port[2] addr[4|16]
 *       -> 'S', then the socket by sendmsg/SCM_RIGHTS on one data byte
 *       -> 'E' 'S'|'B' errno (native int) if socket() or a later step failed
 *   anything else                          -> 'F' 'I', exit non-zero
 *
 * EOF or a read error exits non-zero (1), a write error too (2), and an
 * invalid request after 'F' 'I' exits 3.
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IPV6_MTU
#define IPV6_MTU 24
#endif
#ifndef IPV6_MTU_DISCOVER
#define IPV6_MTU_DISCOVER 23
#endif
#ifndef IPV6_PMTUDISC_DONT
#define IPV6_PMTUDISC_DONT 0
#endif

static void read_exact(void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(0, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            exit(1);
        p += n;
        len -= (size_t)n;
    }
}

static void write_exact(const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(1, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            exit(2);
        p += n;
        len -= (size_t)n;
    }
}

static void send_fd(int fd) {
    unsigned char byte = 0;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg;
    struct cmsghdr *cmsg;

    memset(&msg, 0, sizeof msg);
    memset(&control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    for (;;) {
        ssize_t n = sendmsg(1, &msg, 0);
        if (n == 1)
            return;
        if (n < 0 && errno == EINTR)
            continue;
        exit(2);
    }
}

static void fail(char stage) {
    int err = errno;
    char answer[2] = {'E', stage};
    write_exact(answer, 2);
    write_exact(&err, sizeof err);
}

static void invalid(void) {
    write_exact("FI", 2);
    exit(3);
}

static void create(char type, char family) {
    unsigned char port[2], addr[16];
    struct sockaddr_storage ss;
    socklen_t len;
    int domain = family == '4' ? AF_INET : AF_INET6;
    int fd, on = 1;

    read_exact(port, 2);
    read_exact(addr, family == '4' ? 4 : 16);
    memset(&ss, 0, sizeof ss);
    if (family == '4') {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        memcpy(&sin->sin_port, port, 2);
        memcpy(&sin->sin_addr, addr, 4);
        len = sizeof *sin;
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        sin6->sin6_family = AF_INET6;
        memcpy(&sin6->sin6_port, port, 2);
        memcpy(&sin6->sin6_addr, addr, 16);
        len = sizeof *sin6;
    }

    fd = socket(domain, type == 'T' ? SOCK_STREAM : SOCK_DGRAM, 0);
    if (fd < 0) {
        fail('S');
        return;
    }
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0)
        goto bind_failed;
    if (domain == AF_INET6) {
        if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on) < 0)
            goto bind_failed;
        if (type == 'U') {
#ifdef IPV6_USE_MIN_MTU
            if (setsockopt(fd, IPPROTO_IPV6, IPV6_USE_MIN_MTU, &on, sizeof on) < 0)
                goto bind_failed;
#else
            int mtu = 1280, disc = IPV6_PMTUDISC_DONT;
            if (setsockopt(fd, IPPROTO_IPV6, IPV6_MTU, &mtu, sizeof mtu) < 0 ||
                setsockopt(fd, IPPROTO_IPV6, IPV6_MTU_DISCOVER, &disc, sizeof disc) < 0)
                goto bind_failed;
#endif
        }
    }
    if (bind(fd, (struct sockaddr *)&ss, len) < 0)
        goto bind_failed;
    write_exact("S", 1);
    send_fd(fd);
    close(fd);
    return;

bind_failed:
    {
        int err = errno;
        close(fd);
        errno = err;
        fail('B');
    }
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* a write to a closed peer is EPIPE: exit(2) */
    for (;;) {
        char command, type, family;
        read_exact(&command, 1);
        if (command == 'T')
            return 0;
        if (command != 'S')
            invalid();
        read_exact(&type, 1);
        if (type != 'T' && type != 'U')
            invalid();
        read_exact(&family, 1);
        if (family != '4' && family != '6')
            invalid();
        create(type, family);
    }
}
