/* Open-loop HTTP/1.1 load generator for benchmarks/raft_writes.py (built there with the system C compiler).
 *
 * Request i is due at start + i / rate and goes to connection i % connections, whether or not earlier ones were
 * answered (a closed-loop client such as wrk slows down with the server and so hides its stalls). Responses come
 * back in request order on each connection (HTTP/1.1 pipelining); a request's latency runs from the moment it was
 * due, so a late generator counts against the server, never for it. A timerfd wakes the loop at the next due
 * time, so requests leave on time to the microsecond rather than to epoll's millisecond.
 *
 *   open_loop HOST PORT CONNECTIONS RATE REQUESTS_FILE LATENCIES_FILE
 *
 * REQUESTS_FILE holds the requests, each preceded by its length as a 4-byte little-endian integer. Writes one
 * float64 latency in seconds per request, in request order, to LATENCIES_FILE, and prints one JSON line:
 * {"elapsed": s, "answered": n, "failures": n, "max_lag": s, "first_failure": "..."}. Exits 2 on bad usage or
 * I/O errors, 3 if a connection closed or the answers did not all come within 30 s of the last request.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    char *out;            /* bytes not yet written */
    size_t out_len, out_cap;
    char *in;             /* bytes received, not yet parsed */
    size_t in_len, in_cap;
    size_t *owed;         /* request indexes awaiting an answer, FIFO */
    size_t owed_head, owed_tail, owed_cap;
} Conn;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t cap2 = *cap ? *cap : 65536;
    while (cap2 < need) cap2 *= 2;
    *buf = realloc(*buf, cap2);
    if (!*buf) die("realloc");
    *cap = cap2;
}

static void flush_out(Conn *c) {
    while (c->out_len) {
        ssize_t n = write(c->fd, c->out, c->out_len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            die("write");
        }
        memmove(c->out, c->out + n, c->out_len - n);
        c->out_len -= n;
    }
}

/* The Content-Length of a response head (0 if absent). */
static long content_length(const char *head, size_t len) {
    static const char name[] = "\r\ncontent-length:";
    size_t k = sizeof(name) - 1;
    for (size_t i = 0; i + k <= len; i++) {
        if (strncasecmp(head + i, name, k) == 0) return strtol(head + i + k, NULL, 10);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS RATE REQUESTS_FILE LATENCIES_FILE\n", argv[0]);
        return 2;
    }
    int connections = atoi(argv[3]);
    double rate = atof(argv[4]);
    if (connections < 1 || rate <= 0) {
        fprintf(stderr, "connections and rate must be positive\n");
        return 2;
    }
    FILE *file = fopen(argv[5], "rb");
    if (!file) die(argv[5]);
    struct stat st;
    if (fstat(fileno(file), &st) < 0) die("fstat");
    char *blob = malloc(st.st_size + 1);
    if (!blob || fread(blob, 1, st.st_size, file) != (size_t)st.st_size) die("read requests");
    fclose(file);
    size_t count = 0;
    for (size_t pos = 0; pos + 4 <= (size_t)st.st_size; count++) {
        uint32_t len;
        memcpy(&len, blob + pos, 4);
        pos += 4 + len;
    }
    char **request = malloc(count * sizeof *request);
    uint32_t *request_len = malloc(count * sizeof *request_len);
    double *due = malloc(count * sizeof *due);
    double *latency = calloc(count, sizeof *latency);
    if (!request || !request_len || !due || !latency) die("malloc");
    for (size_t i = 0, pos = 0; i < count; i++) {
        memcpy(&request_len[i], blob + pos, 4);
        request[i] = blob + pos + 4;
        pos += 4 + request_len[i];
    }

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    Conn *conns = calloc(connections, sizeof *conns);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", argv[1]);
        return 2;
    }
    for (int i = 0; i < connections; i++) {
        Conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
        c->owed_cap = count / connections + 2;
        c->owed = malloc(c->owed_cap * sizeof *c->owed);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    }
    int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = (uint32_t)connections};
    if (timer < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, timer, &tev) < 0) die("timerfd");

    double start = now_s() + 0.01, max_lag = 0, last_answer = start;
    for (size_t i = 0; i < count; i++) due[i] = start + i / rate;
    size_t sent = 0, answered = 0, failures = 0;
    char first_failure[301] = "";
    struct epoll_event events[256];
    while (answered < count) {
        double t = now_s();
        while (sent < count && due[sent] <= t) {
            if (t - due[sent] > max_lag) max_lag = t - due[sent];
            Conn *c = &conns[sent % connections];
            grow(&c->out, &c->out_cap, c->out_len + request_len[sent]);
            memcpy(c->out + c->out_len, request[sent], request_len[sent]);
            c->out_len += request_len[sent];
            c->owed[c->owed_tail++ % c->owed_cap] = sent;
            sent++;
        }
        for (int i = 0; i < connections; i++) flush_out(&conns[i]);
        if (sent < count) {
            double next = due[sent];
            struct itimerspec spec = {.it_value = {.tv_sec = (time_t)next,
                                                   .tv_nsec = (long)((next - (time_t)next) * 1e9)}};
            timerfd_settime(timer, TFD_TIMER_ABSTIME, &spec, NULL);
        } else if (t - (sent ? due[sent - 1] : start) > 30) {
            fprintf(stderr, "%zu answers missing 30 s after the last request\n", count - answered);
            return 3;
        }
        int n = epoll_wait(ep, events, 256, sent < count ? -1 : 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            uint32_t id = events[e].data.u32;
            if (id == (uint32_t)connections) {
                uint64_t expirations;
                if (read(timer, &expirations, sizeof expirations) < 0 && errno != EAGAIN) die("timerfd read");
                continue;
            }
            Conn *c = &conns[id];
            if (events[e].events & EPOLLOUT) flush_out(c);
            if (!(events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            for (;;) {
                grow(&c->in, &c->in_cap, c->in_len + 65536);
                ssize_t got = read(c->fd, c->in + c->in_len, 65536);
                if (got < 0) {
                    if (errno == EAGAIN || errno == EINTR) break;
                    die("read");
                }
                if (got == 0) {
                    fprintf(stderr, "connection %u closed by the server with %zu answers owed\n", id,
                            c->owed_tail - c->owed_head);
                    return 3;
                }
                c->in_len += got;
            }
            double at = now_s();
            size_t pos = 0;
            for (;;) {
                char *end = memmem(c->in + pos, c->in_len - pos, "\r\n\r\n", 4);
                if (!end) break;
                size_t head_len = end - (c->in + pos);
                long body = content_length(c->in + pos, head_len);
                size_t total = head_len + 4 + body;
                if (c->in_len - pos < total) break;
                if (c->owed_head == c->owed_tail) {
                    fprintf(stderr, "an answer nobody asked for on connection %u\n", id);
                    return 3;
                }
                size_t index = c->owed[c->owed_head++ % c->owed_cap];
                latency[index] = at - due[index];
                if (head_len < 12 || memcmp(c->in + pos + 9, "200", 3) != 0) {
                    if (!failures++) {
                        size_t keep = total < 300 ? total : 300;
                        memcpy(first_failure, c->in + pos, keep);
                        first_failure[keep] = 0;
                        for (size_t k = 0; k < keep; k++)
                            if (first_failure[k] == '"' || first_failure[k] == '\\' || first_failure[k] < 32)
                                first_failure[k] = ' ';
                    }
                }
                answered++;
                last_answer = at;
                pos += total;
            }
            memmove(c->in, c->in + pos, c->in_len - pos);
            c->in_len -= pos;
        }
    }
    FILE *out = fopen(argv[6], "wb");
    if (!out || fwrite(latency, sizeof *latency, count, out) != count || fclose(out) != 0) die(argv[6]);
    printf("{\"elapsed\": %.6f, \"answered\": %zu, \"failures\": %zu, \"max_lag\": %.6f, \"first_failure\": \"%s\"}\n",
           last_answer - start, answered, failures, max_lag, first_failure);
    return 0;
}
