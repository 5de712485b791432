/* What relaying one streamed piece costs a bare relay in C on this machine: the floor under
 * swapper's pump (swapper/_pump.c) and any other front. A measuring tool, not part of swapper.
 *
 * A producer process sends a 300-byte piece every 0.3 ms over loopback TCP (a token of a
 * stream); the relay, on the same CPU, waits for each piece, reads it and sends it on to a
 * reader on the other CPU, and reports its own CPU time per piece. The wait is `poll` on three
 * descriptors as the pump does (the child's socket, the client's, a wake-up eventfd), `epoll_wait`
 * on the same three, or a blocking `recv`, so the three ways of waiting can be compared.
 *
 *     gcc -O2 -o /tmp/relay_cost bench/relay_cost.c
 *     for mode in poll epoll recv; do /tmp/relay_cost $mode; done
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PIECES 20000
#define PIECE 300

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

/* a connected pair of loopback TCP sockets, Nagle off as llama-server and swapper have it */
static void tcp_pair(int *a, int *b) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t n = sizeof sa;
    bind(l, (struct sockaddr *)&sa, sizeof sa);
    listen(l, 1);
    getsockname(l, (struct sockaddr *)&sa, &n);
    *a = socket(AF_INET, SOCK_STREAM, 0);
    connect(*a, (struct sockaddr *)&sa, sizeof sa);
    *b = accept(l, NULL, NULL);
    setsockopt(*a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(*b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    close(l);
}

static double micros(struct timeval t) { return t.tv_sec * 1e6 + t.tv_usec; }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "poll";
    int child, up, down, client;
    tcp_pair(&child, &up);     /* the engine's end, the relay's end */
    tcp_pair(&down, &client);  /* the relay's end, the client's */
    int wake = eventfd(0, 0);
    if (!fork()) {  /* the engine: a piece every 0.3 ms, on the relay's CPU */
        close(up); close(down); close(client);
        pin(1);
        char piece[PIECE];
        memset(piece, 'x', sizeof piece);
        struct timespec gap = {0, 300000};
        for (int i = 0; i < PIECES; i++) {
            send(child, piece, sizeof piece, 0);
            nanosleep(&gap, NULL);
        }
        _exit(0);
    }
    if (!fork()) {  /* the client, on the other CPU */
        close(child); close(up); close(down);
        pin(0);
        char buf[65536];
        while (recv(client, buf, sizeof buf, 0) > 0) {}
        _exit(0);
    }
    close(child);
    close(client);
    pin(1);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = up};
    epoll_ctl(ep, EPOLL_CTL_ADD, up, &ev);
    ev = (struct epoll_event){.events = EPOLLRDHUP, .data.fd = down};
    epoll_ctl(ep, EPOLL_CTL_ADD, down, &ev);
    ev = (struct epoll_event){.events = EPOLLIN, .data.fd = wake};
    epoll_ctl(ep, EPOLL_CTL_ADD, wake, &ev);
    static char buf[65536];
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    long pieces = 0;
    for (;;) {
        if (!strcmp(mode, "poll")) {
            struct pollfd fds[3] = {{up, POLLIN, 0}, {down, POLLRDHUP, 0}, {wake, POLLIN, 0}};
            poll(fds, 3, 5000);
        } else if (!strcmp(mode, "epoll")) {
            struct epoll_event evs[3];
            epoll_wait(ep, evs, 3, 5000);
        }
        ssize_t n = recv(up, buf, sizeof buf, 0);
        if (n <= 0) break;
        send(down, buf, (size_t)n, MSG_NOSIGNAL);
        pieces++;
    }
    getrusage(RUSAGE_SELF, &r1);
    double user = micros(r1.ru_utime) - micros(r0.ru_utime), sys = micros(r1.ru_stime) - micros(r0.ru_stime);
    printf("%-5s %ld pieces: %.1f us of CPU per piece (user %.1f, system %.1f)\n", mode, pieces,
           (user + sys) / pieces, user / pieces, sys / pieces);
    close(down);
    wait(NULL);
    wait(NULL);
    return 0;
}
