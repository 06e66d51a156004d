/* The "c" driver of bench_broker.py: the lean driver's loop, in C.
 *
 * Not a client library and not a test: a load generator, as wrk2 is one for
 * HTTP.  On a machine with two CPUs the Python lean driver spends about as
 * much CPU per grant as the broker's creator does, and the broker, the
 * creator and the driver then compete for the same two CPUs; this one does
 * the same protocol work (every answer checked, every descriptor received
 * and closed, the same arrivals and the same latency rule) for less.
 *
 *   lean_driver PATH SECONDS PERIOD POISSON FRAME...
 *
 * FRAME: one per connection, "INDEX:HEX" (a whole Q frame, pre-encoded by
 * bench_broker.py; its id, bytes 3..6, is filled in per request).  PERIOD 0
 * is the closed loop; otherwise each connection has one request due every
 * PERIOD seconds on average (POISSON 0: steady, staggered by the golden
 * ratio as bench_broker.Arrivals does; 1: exponential gaps, from its own
 * generator, so not the Python driver's sequence).
 *
 * It connects, greets, warms up for 0.2 s, prints "ready" and waits for one
 * byte on stdin; then it measures for SECONDS and writes one line "USER SYS
 * N" (CPU seconds of this process while measuring, latencies recorded)
 * followed by N native doubles (each grant's latency in seconds).  Any
 * unexpected answer ends it with status 1 and a line on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAXCONN 1024
#define MAXFRAME 258 /* the broker's largest answer frame: 3 + 255 */

struct conn {
    int fd, index;
    unsigned char frame[MAXFRAME];
    size_t frame_len;
    unsigned char buf[2 * MAXFRAME];
    size_t buf_len;
    uint32_t rid;
    uint64_t grant;
    double t0, due, next_due, done;
    int busy;
    unsigned short rng[3];
};

static struct conn conns[MAXCONN];
static int nconn;
static double *lat;
static size_t nlat, cap_lat;

/* What failed, and the system's error if a call failed (errno is cleared
   before the checks that involve no call). */
static void die(const char *what) {
    fprintf(stderr, "lean_driver: %s%s%s\n", what, errno ? ": " : "", errno ? strerror(errno) : "");
    exit(1);
}

static void fail(const char *what) {
    errno = 0;
    die(what);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void send_all(int fd, const unsigned char *p, size_t n) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k != (ssize_t)n) /* a 40-byte frame to a socket with room: all or an error */
        die("send");
}

static void ask(struct conn *c) {
    put32(c->frame + 3, ++c->rid);
    send_all(c->fd, c->frame, c->frame_len);
}

static void release(struct conn *c) {
    unsigned char r[15] = {'R', 0, 12};
    put32(r + 3, ++c->rid);
    for (int i = 0; i < 8; i++)
        r[7 + i] = (unsigned char)(c->grant >> (56 - 8 * i));
    send_all(c->fd, r, sizeof r);
}

static void record(double v) {
    if (nlat == cap_lat) {
        cap_lat = cap_lat ? 2 * cap_lat : 65536;
        lat = realloc(lat, cap_lat * sizeof *lat);
        if (!lat)
            fail("out of memory");
    }
    lat[nlat++] = v;
}

/* Read what came on c: 1 when a cycle (grant, then release) ended. */
static int answer(struct conn *c, int measure) {
    union { char space[CMSG_SPACE(4 * sizeof(int))]; struct cmsghdr align; } anc;
    struct iovec iov = {c->buf + c->buf_len, sizeof c->buf - c->buf_len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = anc.space, .msg_controllen = sizeof anc.space};
    ssize_t n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC);
    if (n <= 0) {
        if (n == 0)
            fail("the broker closed a connection");
        die("recvmsg");
    }
    if (mh.msg_flags & MSG_CTRUNC)
        fail("MSG_CTRUNC");
    int fds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
            close(fd);
            fds++;
        }
    }
    c->buf_len += n;
    if (c->buf_len < 3)
        return 0;
    size_t len = 3 + ((size_t)c->buf[1] << 8 | c->buf[2]);
    if (c->buf_len < len) {
        if (fds)
            fail("a descriptor with a partial frame");
        return 0; /* a frame cut short: wait for the rest */
    }
    unsigned char kind = c->buf[0];
    if (c->buf_len != len || len < 7 || get32(c->buf + 3) != c->rid ||
        (kind != 'G' && kind != 'K') || (kind == 'G') != (fds == 1)) {
        fprintf(stderr, "lean_driver: unexpected answer %c to %u\n", kind, c->rid);
        exit(1);
    }
    c->buf_len = 0;
    if (kind == 'G') {
        if (len < 15)
            fail("short G frame");
        if (measure)
            record(now() - c->t0);
        c->grant = 0;
        for (int i = 0; i < 8; i++)
            c->grant = c->grant << 8 | c->buf[7 + i];
        release(c);
        return 0;
    }
    return 1;
}

static double gap(struct conn *c, double period, int poisson) {
    return poisson ? -log(1.0 - erand48(c->rng)) * period : period;
}

static void run(int ep, int tfd, double until, double period, int poisson, int measure) {
    struct epoll_event evs[MAXCONN + 1];
    int busy = 0;
    double start = now(), armed = 0;
    for (int i = 0; i < nconn; i++) {
        struct conn *c = &conns[i];
        c->busy = 0;
        c->done = start;
        if (!period) {
            c->t0 = start;
            ask(c);
            c->busy = 1;
            busy++;
        } else {
            c->due = start + (poisson ? gap(c, period, 1) : period * fmod(c->index * 0.6180339887, 1.0));
        }
    }
    for (;;) {
        if (period) { /* send what is due; arm the timer for the next due request */
            double t = now(), next = 0;
            for (int i = 0; i < nconn; i++) {
                struct conn *c = &conns[i];
                if (c->busy || c->due > until)
                    continue;
                if (c->due <= t) {
                    /* late because the broker was (the last cycle ended after
                       this one was due): from then; else from the send */
                    c->t0 = c->done > c->due ? c->due : t;
                    c->next_due = c->due + gap(c, period, poisson);
                    ask(c);
                    c->busy = 1;
                    busy++;
                } else if (!next || c->due < next) {
                    next = c->due;
                }
            }
            if (!busy && !next)
                return;
            if (next && next != armed) {
                struct itimerspec its = {{0, 0}, {(time_t)next, (long)((next - (time_t)next) * 1e9)}};
                if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
                    die("timerfd_settime");
                armed = next;
            }
        } else if (!busy) {
            return;
        }
        int n = epoll_wait(ep, evs, MAXCONN + 1, 1000);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32;
            if (i == nconn) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN)
                    die("read timerfd");
                continue;
            }
            struct conn *c = &conns[i];
            if (!answer(c, measure))
                continue;
            double t = now();
            if (period) {
                c->busy = 0;
                busy--;
                c->done = t;
                c->due = c->next_due;
            } else if (t < until) {
                c->t0 = t;
                ask(c);
            } else {
                c->busy = 0;
                busy--;
            }
        }
    }
}

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: lean_driver PATH SECONDS PERIOD POISSON INDEX:HEX...\n");
        return 2;
    }
    const char *path = argv[1];
    double seconds = atof(argv[2]), period = atof(argv[3]);
    int poisson = atoi(argv[4]);
    nconn = argc - 5;
    if (nconn > MAXCONN)
        fail("too many connections");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (ep < 0 || tfd < 0)
        die("epoll or timerfd");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path)
        fail("path too long");
    strcpy(sa.sun_path, path);
    for (int i = 0; i < nconn; i++) {
        struct conn *c = &conns[i];
        char *spec = argv[5 + i], *colon = strchr(spec, ':');
        if (!colon)
            fail("bad FRAME");
        c->index = atoi(spec);
        size_t hex = strlen(colon + 1);
        if (hex % 2 || hex / 2 > MAXFRAME || hex / 2 < 7)
            fail("bad FRAME length");
        for (size_t k = 0; k < hex / 2; k++) {
            int hi = hexval(colon[1 + 2 * k]), lo = hexval(colon[2 + 2 * k]);
            if (hi < 0 || lo < 0)
                fail("bad FRAME hex");
            c->frame[k] = (unsigned char)(hi << 4 | lo);
        }
        c->frame_len = hex / 2;
        c->rng[0] = 0x330e;
        c->rng[1] = (unsigned short)c->index;
        c->rng[2] = (unsigned short)(c->index >> 16);
        c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            die("connect");
        static const unsigned char hello[] = {'H', 0, 1, 1};
        send_all(c->fd, hello, sizeof hello);
        unsigned char reply[10];
        size_t got = 0;
        while (got < sizeof reply) { /* H, 7 bytes of body */
            ssize_t k = recv(c->fd, reply + got, sizeof reply - got, 0);
            if (k <= 0)
                die("hello");
            got += k;
        }
        if (reply[0] != 'H')
            fail("no hello answer");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            die("epoll_ctl");
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)nconn};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev) < 0)
        die("epoll_ctl timerfd");

    run(ep, tfd, now() + 0.2, period, poisson, 0); /* warm up */
    printf("ready\n");
    fflush(stdout);
    char go;
    if (read(0, &go, 1) != 1)
        die("no go");
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    run(ep, tfd, now() + seconds, period, poisson, 1);
    getrusage(RUSAGE_SELF, &r1);
    double user = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) * 1e-6;
    double sys = (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) * 1e-6;
    printf("%.6f %.6f %zu\n", user, sys, nlat);
    fflush(stdout);
    if (nlat && fwrite(lat, sizeof *lat, nlat, stdout) != nlat)
        die("write");
    fflush(stdout);
    for (int i = 0; i < nconn; i++)
        close(conns[i].fd);
    return 0;
}
