/* probe: the in-VM suite's network client, loopback servers and BPF program lister.
 * Built on the host with `cc -static` by `cargo xtask kernels` (the VM has busybox only).
 *
 *   probe serve PORT...                  TCP and UDP servers on 127.0.0.1 and ::1 (forever)
 *   probe connect 4|6|mapped PORT        TCP connect; prints "pid=N result=ok|EPERM|..."
 *   probe send 4|6|mapped PORT           UDP sendto; same output
 *   probe self SOCKET AUDIENCE PORT [GO] POST /v1/credentials for this process, then connect
 *                                        to 127.0.0.1:PORT; with GO, waits for that file to
 *                                        exist and connects again (after a revocation)
 *   probe self SOCKET AUDIENCE PORT GO udp  the same with one connected UDP socket: a send
 *                                        before, a send on the same socket after GO
 *   probe progs [PINDIR]                 every loaded BPF program: name and verified_insns; the
 *                                        full name from a link pinned as PINDIR/.../link-NAME
 * Exit status 0 when every step succeeded, 1 otherwise. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

static const char *errname(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ENETUNREACH: return "ENETUNREACH";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case ENOENT: return "ENOENT";
    case EINVAL: return "EINVAL";
    default: return "EOTHER";
    }
}

/* Fills ss for family "4", "6" or "mapped" (::ffff:127.0.0.1). */
static socklen_t address(const char *family, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (strcmp(family, "4") == 0) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        inet_pton(AF_INET, "127.0.0.1", &a->sin_addr);
        return sizeof *a;
    }
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    inet_pton(AF_INET6, strcmp(family, "mapped") == 0 ? "::ffff:127.0.0.1" : "::1", &a->sin6_addr);
    return sizeof *a;
}

/* One connect (TCP) or sendto (UDP); returns "ok" or the errno's name. */
static const char *attempt(int udp, const char *family, int port) {
    struct sockaddr_storage ss;
    socklen_t len = address(family, port, &ss);
    int fd = socket(ss.ss_family, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
    if (fd < 0) return errname(errno);
    int rc = udp ? (int)sendto(fd, "x", 1, 0, (struct sockaddr *)&ss, len)
                 : connect(fd, (struct sockaddr *)&ss, len);
    const char *result = rc < 0 ? errname(errno) : "ok";
    close(fd);
    return result;
}

static int net(int udp, int argc, char **argv) {
    if (argc != 4) return 2;
    const char *r = attempt(udp, argv[2], atoi(argv[3]));
    printf("pid=%d result=%s\n", getpid(), r);
    return strcmp(r, "ok") != 0;
}

static int listener(int family, int type, int port) {
    int fd = socket(family, type, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage ss;
    socklen_t len = address(family == AF_INET ? "4" : "6", port, &ss);
    if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) < 0) {
        fprintf(stderr, "probe serve: bind port %d: %s\n", port, strerror(errno));
        exit(1);
    }
    if (type == SOCK_STREAM) listen(fd, 64);
    return fd;
}

static _Noreturn int serve(int argc, char **argv) {
    struct pollfd fds[64];
    int stream[64], n = 0;
    for (int i = 2; i < argc && n + 4 <= 64; i++) {
        int port = atoi(argv[i]);
        int fams[2] = {AF_INET, AF_INET6};
        for (int f = 0; f < 2; f++) {
            fds[n] = (struct pollfd){listener(fams[f], SOCK_STREAM, port), POLLIN, 0};
            stream[n++] = 1;
            fds[n] = (struct pollfd){listener(fams[f], SOCK_DGRAM, port), POLLIN, 0};
            stream[n++] = 0;
        }
    }
    printf("serving\n");
    fflush(stdout);
    for (;;) {
        if (poll(fds, n, -1) < 0) continue;
        for (int i = 0; i < n; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            if (stream[i]) {
                int c = accept(fds[i].fd, NULL, NULL);
                if (c >= 0) {
                    (void)!write(c, "hello\n", 6);
                    close(c);
                }
            } else {
                char buf[64];
                (void)!recv(fds[i].fd, buf, sizeof buf, 0);
            }
        }
    }
}

/* POST /v1/credentials on the unix socket; prints "status=N" and the jti or the error. */
static int hold_udp(const char *jti, int port, const char *go);

static int self_credential(int argc, char **argv) {
    if (argc < 5 || argc > 7) return 2;
    const char *sock = argv[2], *audience = argv[3];
    int port = atoi(argv[4]);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    strncpy(un.sun_path, sock, sizeof un.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&un, sizeof un) < 0) {
        printf("pid=%d status=0 error=cannot-reach-%s\n", getpid(), errname(errno));
        return 1;
    }
    char body[256], req[512];
    int blen = snprintf(body, sizeof body, "{\"audience\":\"%s\",\"task\":\"kernels\"}", audience);
    int rlen = snprintf(req, sizeof req,
                        "POST /v1/credentials HTTP/1.1\r\nHost: tessera\r\n"
                        "Content-Type: application/json\r\nContent-Length: %d\r\n"
                        "Connection: close\r\n\r\n%s",
                        blen, body);
    (void)!write(fd, req, rlen);
    static char resp[65536];
    size_t got = 0;
    ssize_t r;
    while (got < sizeof resp - 1 && (r = read(fd, resp + got, sizeof resp - 1 - got)) > 0) got += r;
    resp[got] = 0;
    close(fd);
    int status = 0;
    sscanf(resp, "HTTP/1.1 %d", &status);
    char *payload = strstr(resp, "\r\n\r\n");
    payload = payload ? payload + 4 : resp;
    if (status != 200) {
        /* The refusal's JSON on one line; never a token (there is none in a refusal). */
        for (char *p = payload; *p; p++)
            if (*p == '\n' || *p == '\r') *p = ' ';
        printf("pid=%d status=%d body=%.300s\n", getpid(), status, payload);
        return 1;
    }
    char jti[128] = "?";
    char *j = strstr(payload, "\"jti\":\"");
    if (j) sscanf(j + 7, "%127[^\"]", jti);
    if (argc == 7) return hold_udp(jti, port, argv[5]);
    const char *first = attempt(0, "4", port);
    printf("pid=%d status=200 jti=%s connect=%s\n", getpid(), jti, first);
    fflush(stdout);
    if (argc == 5) return strcmp(first, "ok") != 0;
    struct stat st;
    for (int i = 0; i < 1200 && stat(argv[5], &st) < 0; i++) usleep(50000);
    const char *after = attempt(0, "4", port);
    printf("pid=%d after=%s\n", getpid(), after);
    return 0;
}

/* One send on the connected UDP socket FD. */
static const char *send_connected(int fd) {
    return send(fd, "x", 1, 0) < 0 ? errname(errno) : "ok";
}

/* `probe self ... GO udp`: a UDP socket connected under the credential, one send before GO
 * and one after (the socket's connection lives only while the credential does). */
static int hold_udp(const char *jti, int port, const char *go) {
    struct sockaddr_storage ss;
    socklen_t len = address("4", port, &ss);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    const char *first = connect(fd, (struct sockaddr *)&ss, len) < 0 ? errname(errno)
                                                                       : send_connected(fd);
    printf("pid=%d status=200 jti=%s connect=%s\n", getpid(), jti, first);
    fflush(stdout);
    struct stat st;
    for (int i = 0; i < 1200 && stat(go, &st) < 0; i++) usleep(50000);
    printf("pid=%d after=%s\n", getpid(), send_connected(fd));
    return 0;
}

static long bpf(int cmd, union bpf_attr *attr) {
    return syscall(__NR_bpf, cmd, attr, sizeof *attr);
}

/* Program ids and full names from the links pinned below dir (`link-<program>`): the kernel
 * keeps only 15 characters of a program's name. */
#define MAX_NAMED 64
static unsigned int named_id[MAX_NAMED];
static char named[MAX_NAMED][64];
static int named_count;

static void pinned_links(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) && named_count < MAX_NAMED) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
            pinned_links(path);
            continue;
        }
        if (strncmp(e->d_name, "link-", 5) != 0) continue;
        union bpf_attr attr;
        memset(&attr, 0, sizeof attr);
        attr.pathname = (unsigned long)path;
        int fd = (int)bpf(BPF_OBJ_GET, &attr);
        if (fd < 0) continue;
        struct bpf_link_info info;
        memset(&info, 0, sizeof info);
        memset(&attr, 0, sizeof attr);
        attr.info.bpf_fd = fd;
        attr.info.info_len = sizeof info;
        attr.info.info = (unsigned long)&info;
        if (bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) == 0 && info.prog_id) {
            named_id[named_count] = info.prog_id;
            snprintf(named[named_count], sizeof named[0], "%s", e->d_name + 5);
            named_count++;
        }
        close(fd);
    }
    closedir(d);
}

static const char *full_name(unsigned int id, const char *short_name) {
    for (int i = 0; i < named_count; i++)
        if (named_id[i] == id) return named[i];
    return short_name;
}

/* Like `bpftool prog`: each program's name, type and the instructions its verifier processed
 * (bpf_prog_info.verified_insns, 5.16+; "n/a" where the kernel's info is shorter). */
static int progs(const char *pins) {
    if (pins) pinned_links(pins);
    unsigned int id = 0;
    int count = 0;
    for (;;) {
        union bpf_attr attr;
        memset(&attr, 0, sizeof attr);
        attr.start_id = id;
        if (bpf(BPF_PROG_GET_NEXT_ID, &attr) < 0) break;
        id = attr.next_id;
        memset(&attr, 0, sizeof attr);
        attr.prog_id = id;
        int fd = (int)bpf(BPF_PROG_GET_FD_BY_ID, &attr);
        if (fd < 0) continue;
        struct bpf_prog_info info;
        memset(&info, 0, sizeof info);
        memset(&attr, 0, sizeof attr);
        attr.info.bpf_fd = fd;
        attr.info.info_len = sizeof info;
        attr.info.info = (unsigned long)&info;
        if (bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) == 0) {
            size_t end = offsetof(struct bpf_prog_info, verified_insns) + sizeof info.verified_insns;
            if (attr.info.info_len >= end)
                printf("prog id=%u type=%u name=%s verified_insns=%u\n", id, info.type,
                       full_name(id, info.name), info.verified_insns);
            else
                printf("prog id=%u type=%u name=%s verified_insns=n/a\n", id, info.type,
                       full_name(id, info.name));
            count++;
        }
        close(fd);
    }
    printf("progs count=%d\n", count);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "serve") == 0) return serve(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "connect") == 0) return net(0, argc, argv);
    if (argc >= 2 && strcmp(argv[1], "send") == 0) return net(1, argc, argv);
    if (argc >= 2 && strcmp(argv[1], "self") == 0) return self_credential(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "progs") == 0) return progs(argc > 2 ? argv[2] : NULL);
    fprintf(stderr, "usage: probe serve|connect|send|self|progs ... (see probe.c)\n");
    return 2;
}
