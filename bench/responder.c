/* The kernel's floor: a UDP "DNS server" that does no DNS work at all.
 *
 * Each datagram is sent back to its source with the QR bit set, nothing else changed.
 * Receive and send are batched with recvmmsg/sendmmsg exactly as kdns's workers do, so
 * the gap between this and kdns is the cost of answering, not of moving packets.
 *
 *   responder -p PORT [-a 127.0.0.1] [-b 64] [-l MAX_SECONDS]
 *
 * Loopback only (refuses any other bind address). It stops by itself after -l seconds
 * (default 600) so a crashed harness never leaves it running; SIGTERM/SIGINT stop it too.
 * On exit it prints one JSON line: packets answered.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXBATCH 1024
#define PKT 4096

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    const char *addr = "127.0.0.1";
    int port = 0, batch = 64, opt;
    double limit = 600;
    while ((opt = getopt(argc, argv, "a:p:b:l:")) != -1) {
        switch (opt) {
        case 'a': addr = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'l': limit = atof(optarg); break;
        default:
            fprintf(stderr, "usage: %s -p PORT [-a 127.0.0.1] [-b BATCH] [-l SECONDS]\n", argv[0]);
            return 2;
        }
    }
    if (port <= 0 || port > 65535 || batch < 1 || batch > MAXBATCH) {
        fprintf(stderr, "responder: need -p PORT (1-65535) and -b 1..%d\n", MAXBATCH);
        return 2;
    }
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1 || (ntohl(sin.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "responder: %s is not a 127.0.0.0/8 address; loopback only\n", addr);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int one = 1, buf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0) {
        perror("responder: bind");
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    static char bufs[MAXBATCH][PKT];
    static struct iovec iov[MAXBATCH];
    static struct sockaddr_in from[MAXBATCH];
    static struct mmsghdr msgs[MAXBATCH];
    unsigned long long answered = 0;
    double deadline = now_s() + limit;
    struct pollfd pfd = {.fd = fd, .events = POLLIN};

    while (!stop) {
        /* Poll with a timeout only so that the deadline and signals are noticed. */
        if (poll(&pfd, 1, 100) <= 0) {
            if (now_s() > deadline) break;
            continue;
        }
        for (int i = 0; i < batch; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = PKT;
            msgs[i].msg_hdr = (struct msghdr){.msg_name = &from[i], .msg_namelen = sizeof from[i],
                                              .msg_iov = &iov[i], .msg_iovlen = 1};
        }
        int n = recvmmsg(fd, msgs, batch, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        for (int i = 0; i < n; i++) {
            if (msgs[i].msg_len >= 12) bufs[i][2] |= 0x80;   /* QR */
            iov[i].iov_len = msgs[i].msg_len;
        }
        /* sendmmsg may send fewer than asked (full socket buffer): retry the rest, then
         * drop; a real server drops too. */
        int off = 0;
        while (off < n) {
            int s = sendmmsg(fd, msgs + off, n - off, 0);
            if (s <= 0) {
                if (s < 0 && errno == EINTR) continue;
                break;
            }
            off += s;
        }
        answered += off;
        if (now_s() > deadline) break;   /* one vDSO call per batch: cheap */
    }
    printf("{\"answered\": %llu}\n", answered);
    return 0;
}
