/* The benchmark's load generator (agent/benches/daemon.rs), built with `cc -O2` at run time.
 *
 *   client CGROUP_PROCS tcp PORT COUNT         COUNT loopback connect+close; prints the ns taken
 *   client CGROUP_PROCS udp PORT RATE SECONDS  sendto() at RATE datagrams/s for SECONDS, paced
 *                                              per millisecond; prints "sent ns"
 *   client CGROUP_PROCS udp-burst PORT COUNT   COUNT sendto() as fast as it can; prints the ns
 *
 * It first moves itself into the cgroup whose cgroup.procs is CGROUP_PROCS, so every call it
 * makes is decided (or not) by what is attached there. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int enter_cgroup(const char *procs) {
    FILE *f = fopen(procs, "w");
    if (!f) { perror(procs); return -1; }
    if (fprintf(f, "%d\n", getpid()) < 0 || fclose(f) != 0) { perror(procs); return -1; }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: client CGROUP_PROCS tcp PORT COUNT | udp PORT RATE SECONDS"
                        " | udp-burst PORT COUNT\n");
        return 2;
    }
    if (enter_cgroup(argv[1]) != 0) return 1;
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (strcmp(argv[2], "tcp") == 0) {
        long count = atol(argv[4]);
        long long start = now_ns();
        for (long i = 0; i < count; i++) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (s < 0) { perror("socket"); return 1; }
            /* Closed with a reset: no TIME_WAIT, so tens of thousands of connects never run
             * the ephemeral ports out (which would measure the port search instead). */
            struct linger reset = { .l_onoff = 1, .l_linger = 0 };
            setsockopt(s, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
            if (connect(s, (struct sockaddr *)&to, sizeof to) != 0) { perror("connect"); return 1; }
            close(s);
        }
        printf("%lld\n", now_ns() - start);
        return 0;
    }
    if (strcmp(argv[2], "udp-burst") == 0) {
        long count = atol(argv[4]);
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0) { perror("socket"); return 1; }
        long long start = now_ns();
        for (long i = 0; i < count; i++) {
            /* Unconnected, as above: every datagram passes sendmsg4. */
            sendto(s, "x", 1, 0, (struct sockaddr *)&to, sizeof to);
        }
        printf("%lld\n", now_ns() - start);
        return 0;
    }
    if (strcmp(argv[2], "udp") == 0 && argc >= 6) {
        double rate = atof(argv[4]);
        double seconds = atof(argv[5]);
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0) { perror("socket"); return 1; }
        long long start = now_ns(), end = start + (long long)(seconds * 1e9);
        long long sent = 0, t;
        while ((t = now_ns()) < end) {
            long long due = (long long)((double)(t - start) * rate / 1e9);
            while (sent < due) {
                /* Unconnected: every datagram passes sendmsg4. A full receive queue drops it
                 * after the decision, which is all this measures. */
                sendto(s, "x", 1, 0, (struct sockaddr *)&to, sizeof to);
                sent++;
            }
            struct timespec pause = { 0, 1000000 - (now_ns() - t) % 1000000 };
            nanosleep(&pause, NULL);
        }
        printf("%lld %lld\n", sent, now_ns() - start);
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", argv[2]);
    return 2;
}
