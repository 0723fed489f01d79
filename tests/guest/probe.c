/*
 * probe: a static test program for vmrun guests (no busybox applet speaks
 * AF_VSOCK).
 *
 *   probe connect PORT MESSAGE   connect to the host (CID 2) on PORT, send
 *                                MESSAGE, shut down writing, print what
 *                                comes back
 *   probe listen PORT            accept one connection on PORT, echo it
 *   probe pingpong PORT COUNT    connect to the host on PORT and do COUNT
 *                                one-byte round trips
 *   probe bulk PORT BYTES        connect to the host on PORT and send BYTES
 *                                bytes of a known pattern, then print the
 *                                reply
 *   probe agent CID PORT         connect to CID (a number; -1 for
 *                                VMADDR_CID_ANY) on PORT and send a vmrun
 *                                agent hello. Exit 0: something answered
 *                                (the agent was reached); 3: the connect
 *                                failed; 4: connected, but closed without
 *                                an answer (or none within 10 s)
 *   probe escape DIR             the classic chroot escape: chroot into DIR
 *                                (made if missing) keeping the working
 *                                directory outside, climb with "..", chroot
 *                                there, then print "escaped:" and the names
 *                                in "/" (exit 5: a step was refused)
 *
 * Built by the tests with `cc -static`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <dirent.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <linux/vm_sockets.h>

static int die(const char *what) {
    perror(what);
    return 1;
}

static int echo(int fd) {
    char buf[65536];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) return die("read");
        if (n == 0) return 0;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(fd, buf + off, n - off);
            if (w < 0) return die("write");
            off += w;
        }
    }
}

static int connect_host(unsigned port) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) return -1;
    return fd;
}

static int print_reply(int fd) {
    char buf[4096];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof buf - 1 && (n = read(fd, buf + got, sizeof buf - 1 - got)) > 0) got += n;
    buf[got] = 0;
    printf("%s\n", buf);
    return 0;
}

/* A vmrun agent hello frame: len u32 LE, kind 1 (hello), id 0, JSON. Version
 * 1 on purpose: an agent answers any hello of another version with its own
 * before it hangs up, so reaching it shows as an answer. */
static int agent(const char *cid_arg, unsigned port) {
    long cid = strtol(cid_arg, NULL, 0);
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) return die("socket");
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = (unsigned)cid, .svm_port = port};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        printf("cid %s port %u: connect: %s\n", cid_arg, port, strerror(errno));
        return 3;
    }
    static const char json[] = "{\"magic\":\"vmrun-agent\",\"version\":1,\"software\":\"probe\"}";
    unsigned char frame[9 + sizeof json];
    unsigned len = sizeof json - 1;
    frame[0] = len & 0xff; frame[1] = (len >> 8) & 0xff; frame[2] = (len >> 16) & 0xff; frame[3] = len >> 24;
    frame[4] = 1;
    memset(frame + 5, 0, 4);
    memcpy(frame + 9, json, len);
    if (write(fd, frame, 9 + len) < 0) {
        printf("cid %s port %u: connected; write: %s\n", cid_arg, port, strerror(errno));
        return 4;
    }
    char buf[256];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0) {
        printf("cid %s port %u: ANSWERED with %zd bytes\n", cid_arg, port, n);
        return 0;
    }
    printf("cid %s port %u: connected; no answer: %s\n", cid_arg, port, n == 0 ? "closed" : strerror(errno));
    return 4;
}

static int escape(const char *dir) {
    mkdir(dir, 0700);
    if (chroot(dir) < 0) {
        printf("chroot %s: %s\n", dir, strerror(errno));
        return 5;
    }
    for (int i = 0; i < 64; i++)
        if (chdir("..") < 0) return die("chdir ..");
    if (chroot(".") < 0) {
        printf("chroot .: %s\n", strerror(errno));
        return 5;
    }
    DIR *d = opendir("/");
    if (!d) return die("opendir /");
    printf("escaped:");
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) printf(" %s", e->d_name);
    printf("\n");
    closedir(d);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "escape")) return escape(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "agent")) return agent(argv[2], atoi(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "connect")) {
        int fd = connect_host(atoi(argv[2]));
        if (fd < 0) return die("connect");
        if (write(fd, argv[3], strlen(argv[3])) < 0) return die("write");
        shutdown(fd, SHUT_WR);
        return print_reply(fd);
    }
    if (argc >= 4 && !strcmp(argv[1], "bulk")) {
        int fd = connect_host(atoi(argv[2]));
        if (fd < 0) return die("connect");
        long total = atol(argv[3]);
        static char buf[65536];
        for (size_t i = 0; i < sizeof buf; i++) buf[i] = (char)(i * 7 + 3);
        for (long sent = 0; sent < total;) {
            long chunk = total - sent < (long)sizeof buf ? total - sent : (long)sizeof buf;
            ssize_t w = write(fd, buf, chunk);
            if (w < 0) return die("write");
            sent += w;
        }
        shutdown(fd, SHUT_WR);
        return print_reply(fd);
    }
    if (argc >= 4 && !strcmp(argv[1], "pingpong")) {
        int fd = connect_host(atoi(argv[2]));
        if (fd < 0) return die("connect");
        long count = atol(argv[3]);
        char b = 'p';
        for (long i = 0; i < count; i++) {
            if (write(fd, &b, 1) != 1) return die("write");
            if (read(fd, &b, 1) != 1) return die("read");
        }
        close(fd);
        printf("pingpong: %ld round trips\n", count);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "listen")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = atoi(argv[2])};
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1) < 0) return die("listen");
        printf("probe: listening on vsock port %s\n", argv[2]);
        fflush(stdout);
        int fd = accept(s, NULL, NULL);
        if (fd < 0) return die("accept");
        return echo(fd);
    }
    fprintf(stderr, "usage: probe connect PORT MESSAGE | listen PORT | bulk PORT BYTES | pingpong PORT COUNT | agent CID PORT\n");
    return 2;
}
