/* A batched UDP DNS load generator for loopback benchmarks.
 *
 * Why not only dnsperf: dnsperf makes one syscall per query and its own core saturates
 * near 150-170k queries/s on this machine, below what a batched server can answer, so its
 * figures measure dnsperf. This tool sends and receives with sendmmsg/recvmmsg, keeps a
 * fixed window of queries in flight (closed loop, no rate limit) and so measures the server.
 *
 *   loadgen -p PORT -d QUERYFILE -l SECONDS [-s 127.0.0.1] [-w WINDOW] [-b BATCH]
 *           [-c SOCKETS] [-t TIMEOUT_S] [-g GRACE_S] [-n MAX_QUERIES] [-e]
 *
 * QUERYFILE is dnsperf's format: one "name TYPE" per line, ';' starts a comment; the file is
 * cycled. Every query gets a DNS ID that is free (IDs are recycled first-in first-out, so a
 * late reply is unlikely to hit a reused ID) and the reply must echo ID and question to count.
 * A query unanswered after TIMEOUT is given up (its ID returns to the pool). After SECONDS
 * sending stops and replies are awaited for GRACE seconds; lost = sent - answered.
 * Several sockets (-c) give several source ports, so SO_REUSEPORT spreads the load over
 * several server workers, as dnsperf's -c does.
 *
 * Output: one JSON line on stdout. Latency is from the sendmmsg batch to the recvmmsg batch
 * that carried the reply (both timestamped once per batch), in a 1 us histogram.
 *
 * Loopback only: any server address outside 127.0.0.0/8 and ::1 is refused. Time (-l, at
 * most 3600 s) and optionally count (-n) bound every run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXBATCH 512
#define MAXSOCK 64
#define NIDS 65536
#define ORDER_CAP (1u << 20)      /* sent-order ring; covers >= 1 s at 1M qps */
#define HIST_US 100000            /* 1 us buckets up to 100 ms, then one overflow bucket */
#define RBUF 1500

typedef struct { uint64_t t; uint32_t q; uint32_t seq; uint8_t busy; } slot_t;
typedef struct { uint16_t id; uint32_t seq; } order_t;

static uint8_t *qwire;          /* all queries, wire format, back to back */
static uint32_t *qoff;          /* offset of query i in qwire */
static uint16_t *qlen, *qqlen;  /* whole length; question section length */
static uint32_t nq, qcap;

static slot_t slots[NIDS];
static uint16_t freeq[NIDS];
static uint32_t free_head, free_n;
static order_t *order;
static uint32_t ord_head, ord_n;
static uint64_t hist[HIST_US + 1];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int qtype_code(const char *t) {
    static const struct { const char *n; int v; } types[] = {
        {"A", 1}, {"NS", 2}, {"CNAME", 5}, {"SOA", 6}, {"PTR", 12}, {"MX", 15}, {"TXT", 16},
        {"AAAA", 28}, {"SRV", 33}, {"NAPTR", 35}, {"DS", 43}, {"HTTPS", 65}, {"SVCB", 64},
        {"CAA", 257}, {"ANY", 255}};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (!strcasecmp(t, types[i].n)) return types[i].v;
    if (!strncasecmp(t, "TYPE", 4) && isdigit((unsigned char)t[4])) return atoi(t + 4);
    return -1;
}

/* Append one query (ID 0, RD set like dnsperf) to the pre-encoded set. */
static int add_query(const char *name, int qtype, int edns) {
    uint8_t pkt[512];
    size_t o = 12;
    memset(pkt, 0, 12);
    pkt[2] = 0x01;                               /* RD */
    pkt[5] = 1;                                  /* QDCOUNT */
    const char *p = name;
    while (*p && !(p[0] == '.' && p[1] == 0)) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        if (n == 0 || n > 63 || o + n + 1 > 255 + 12) return -1;
        pkt[o++] = (uint8_t)n;
        memcpy(pkt + o, p, n);
        o += n;
        p += n + (dot ? 1 : 0);
    }
    pkt[o++] = 0;
    pkt[o++] = qtype >> 8; pkt[o++] = qtype & 0xff;
    pkt[o++] = 0; pkt[o++] = 1;                  /* class IN */
    size_t question = o - 12;
    if (edns) {                                  /* OPT: root, type 41, size 1232, v0 */
        static const uint8_t opt[11] = {0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0};
        memcpy(pkt + o, opt, 11);
        o += 11;
        pkt[11] = 1;
    }
    if (nq == qcap) {
        qcap = qcap ? qcap * 2 : 4096;
        qoff = realloc(qoff, qcap * sizeof *qoff);
        qlen = realloc(qlen, qcap * sizeof *qlen);
        qqlen = realloc(qqlen, qcap * sizeof *qqlen);
        qwire = realloc(qwire, (size_t)qcap * 300);
        if (!qoff || !qlen || !qqlen || !qwire) { perror("loadgen"); exit(1); }
    }
    qoff[nq] = nq ? qoff[nq - 1] + qlen[nq - 1] : 0;
    memcpy(qwire + qoff[nq], pkt, o);
    qlen[nq] = (uint16_t)o;
    qqlen[nq] = (uint16_t)question;
    nq++;
    return 0;
}

static int load_file(const char *path, int edns) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return -1; }
    char line[1024], name[512], type[64];
    unsigned lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *s = line;
        while (isspace((unsigned char)*s)) s++;
        if (!*s || *s == ';' || *s == '#') continue;
        int k = sscanf(s, "%511s %63s", name, type);
        int t = k == 2 ? qtype_code(type) : (k == 1 ? 1 : -1);
        if (t < 0 || add_query(name, t, edns) < 0) {
            fprintf(stderr, "loadgen: %s:%u: cannot encode \"%s\"\n", path, lineno, s);
            fclose(f);
            return -1;
        }
    }
    fclose(f);
    return 0;
}

static double pct(uint64_t total, double p) {
    if (!total) return 0;
    uint64_t want = (uint64_t)(p * total + 0.999999), acc = 0;
    if (want < 1) want = 1;
    for (int i = 0; i <= HIST_US; i++) {
        acc += hist[i];
        if (acc >= want) return i;
    }
    return HIST_US;
}

int main(int argc, char **argv) {
    const char *server = "127.0.0.1", *file = NULL;
    int port = 0, window = 512, batch = 32, nsock = 1, edns = 0, opt;
    double duration = 0, timeout = 1.0, grace = 1.0;
    unsigned long long maxq = 0;
    while ((opt = getopt(argc, argv, "s:p:d:l:w:b:c:t:g:n:e")) != -1) {
        switch (opt) {
        case 's': server = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'd': file = optarg; break;
        case 'l': duration = atof(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'c': nsock = atoi(optarg); break;
        case 't': timeout = atof(optarg); break;
        case 'g': grace = atof(optarg); break;
        case 'n': maxq = strtoull(optarg, NULL, 10); break;
        case 'e': edns = 1; break;
        default: goto usage;
        }
    }
    if (!file || port <= 0 || port > 65535 || duration <= 0 || duration > 3600 || window < 1 ||
        window > NIDS / 2 || batch < 1 || batch > MAXBATCH || nsock < 1 || nsock > MAXSOCK ||
        timeout <= 0 || grace < 0 || grace > 60) {
usage:
        fprintf(stderr, "usage: %s -p PORT -d QUERYFILE -l SECONDS(<=3600) [-s 127.0.0.1] "
                        "[-w WINDOW<=32768] [-b BATCH<=%d] [-c SOCKETS<=%d] [-t TIMEOUT_S] "
                        "[-g GRACE_S] [-n MAX_QUERIES] [-e]\n", argv[0], MAXBATCH, MAXSOCK);
        return 2;
    }

    /* Loopback only, by construction: parse the address and check the range. */
    struct sockaddr_storage ss = {0};
    socklen_t sslen;
    int family;
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, server, &s4->sin_addr) == 1) {
        if ((ntohl(s4->sin_addr.s_addr) >> 24) != 127) goto notloop;
        s4->sin_family = family = AF_INET;
        s4->sin_port = htons(port);
        sslen = sizeof *s4;
    } else if (inet_pton(AF_INET6, server, &s6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&s6->sin6_addr)) goto notloop;
        s6->sin6_family = family = AF_INET6;
        s6->sin6_port = htons(port);
        sslen = sizeof *s6;
    } else {
notloop:
        fprintf(stderr, "loadgen: refusing %s: only 127.0.0.0/8 and ::1 may be targeted\n", server);
        return 2;
    }

    if (load_file(file, edns) < 0) return 2;
    if (!nq) { fprintf(stderr, "loadgen: %s has no queries\n", file); return 2; }
    order = calloc(ORDER_CAP, sizeof *order);
    if (!order) { perror("loadgen"); return 1; }

    int fds[MAXSOCK];
    struct pollfd pfds[MAXSOCK];
    for (int i = 0; i < nsock; i++) {
        fds[i] = socket(family, SOCK_DGRAM, 0);
        int sz = 4 << 20;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
        setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
        /* Connected: send without an address, and only the server's replies are accepted. */
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&ss, sslen) < 0) {
            perror("loadgen: socket");
            return 1;
        }
        pfds[i] = (struct pollfd){.fd = fds[i], .events = POLLIN};
    }
    for (uint32_t i = 0; i < NIDS; i++) freeq[i] = (uint16_t)i;
    free_n = NIDS;

    static struct mmsghdr smsg[MAXBATCH], rmsg[MAXBATCH];
    static struct iovec siov[MAXBATCH][2], riov[MAXBATCH];
    static uint8_t sid[MAXBATCH][2], rbuf[MAXBATCH][RBUF];
    for (int i = 0; i < MAXBATCH; i++) {
        riov[i] = (struct iovec){.iov_base = rbuf[i], .iov_len = RBUF};
        rmsg[i].msg_hdr = (struct msghdr){.msg_iov = &riov[i], .msg_iovlen = 1};
    }

    unsigned long long sent = 0, answered = 0, answered_run = 0, timeouts = 0, unmatched = 0,
                       mismatched = 0, send_err = 0, refused = 0, rcodes[16] = {0};
    uint64_t lat_sum = 0, lat_min = UINT64_MAX, lat_max = 0;
    uint32_t seq = 0, next_q = 0, inflight = 0;
    uint64_t t_timeout = (uint64_t)(timeout * 1e9);
    uint64_t t0 = now_ns(), t_end = t0 + (uint64_t)(duration * 1e9), t_run_end = 0;
    int cur = 0, sending = 1;
    uint64_t t_drain_end = 0, t_last_answer = 0;

    for (;;) {
        uint64_t now = now_ns();
        if (sending && (now >= t_end || (maxq && sent >= maxq))) {
            sending = 0;
            t_run_end = now;
            answered_run = answered;
            t_drain_end = now + (uint64_t)(grace * 1e9);
        }
        if (!sending && (inflight == 0 || now >= t_drain_end)) break;
        int progress = 0;

        /* Send: fill the window, one batch per socket in turn. */
        while (sending && inflight < (uint32_t)window) {
            int k = window - inflight;
            if (k > batch) k = batch;
            if (maxq && sent + k > maxq) k = (int)(maxq - sent);
            if (k <= 0) break;
            now = now_ns();
            for (int i = 0; i < k; i++) {
                uint16_t id = freeq[free_head];
                free_head = (free_head + 1) % NIDS;
                free_n--;
                uint32_t q = next_q;
                next_q = next_q + 1 == nq ? 0 : next_q + 1;
                slots[id] = (slot_t){.t = now, .q = q, .seq = ++seq, .busy = 1};
                if (ord_n == ORDER_CAP) {        /* ring full: the oldest entry is expired */
                    order_t *o = &order[ord_head];
                    if (slots[o->id].busy && slots[o->id].seq == o->seq) {
                        slots[o->id].busy = 0;
                        freeq[(free_head + free_n) % NIDS] = o->id;
                        free_n++;
                        inflight--;
                        timeouts++;
                    }
                    ord_head = (ord_head + 1) % ORDER_CAP;
                    ord_n--;
                }
                order[(ord_head + ord_n) % ORDER_CAP] = (order_t){id, seq};
                ord_n++;
                sid[i][0] = id >> 8;
                sid[i][1] = id & 0xff;
                siov[i][0] = (struct iovec){.iov_base = sid[i], .iov_len = 2};
                siov[i][1] = (struct iovec){.iov_base = qwire + qoff[q] + 2, .iov_len = qlen[q] - 2};
                smsg[i].msg_hdr = (struct msghdr){.msg_iov = siov[i], .msg_iovlen = 2};
            }
            int r = sendmmsg(fds[cur], smsg, k, MSG_DONTWAIT);
            if (r < 0) {
                if (errno == ECONNREFUSED) refused++;
                else if (errno != EAGAIN && errno != ENOBUFS && errno != EINTR) send_err++;
                r = 0;
            }
            /* Give back the IDs of what the kernel did not take (their order entries are
             * skipped later because the slot is no longer busy). */
            for (int i = r; i < k; i++) {
                uint16_t id = (uint16_t)((sid[i][0] << 8) | sid[i][1]);
                slots[id].busy = 0;
                freeq[(free_head + free_n) % NIDS] = id;
                free_n++;
            }
            sent += r;
            inflight += r;
            cur = cur + 1 == nsock ? 0 : cur + 1;
            if (r) progress = 1;
            if (r < k) break;
        }

        /* Receive: one batch from every socket. */
        for (int s = 0; s < nsock; s++) {
            int r = recvmmsg(fds[s], rmsg, batch, MSG_DONTWAIT, NULL);
            if (r < 0) {
                if (errno == ECONNREFUSED) refused++;   /* ICMP port unreachable */
                continue;
            }
            if (r == 0) continue;
            progress = 1;
            now = now_ns();
            for (int i = 0; i < r; i++) {
                uint8_t *b = rbuf[i];
                unsigned len = rmsg[i].msg_len;
                if (len < 12 || !(b[2] & 0x80)) { unmatched++; continue; }
                uint16_t id = (uint16_t)((b[0] << 8) | b[1]);
                slot_t *sl = &slots[id];
                if (!sl->busy) { unmatched++; continue; }
                uint32_t q = sl->q;
                if (len < 12u + qqlen[q] || memcmp(b + 12, qwire + qoff[q] + 12, qqlen[q])) {
                    mismatched++;               /* same ID, other question: a stale reply */
                    continue;
                }
                uint64_t lat = (now - sl->t) / 1000;
                hist[lat < HIST_US ? lat : HIST_US]++;
                lat_sum += lat;
                if (lat < lat_min) lat_min = lat;
                if (lat > lat_max) lat_max = lat;
                rcodes[b[3] & 0xf]++;
                sl->busy = 0;
                freeq[(free_head + free_n) % NIDS] = id;
                free_n++;
                inflight--;
                answered++;
                t_last_answer = now;
            }
        }

        /* Expire: the oldest queries first, in send order. */
        now = now_ns();
        while (ord_n) {
            order_t *o = &order[ord_head];
            slot_t *sl = &slots[o->id];
            if (sl->busy && sl->seq == o->seq) {
                if (now - sl->t < t_timeout) break;
                sl->busy = 0;
                freeq[(free_head + free_n) % NIDS] = o->id;
                free_n++;
                inflight--;
                timeouts++;
            }
            ord_head = (ord_head + 1) % ORDER_CAP;
            ord_n--;
        }

        if (!progress) poll(pfds, nsock, 1);
    }

    double run_s = (t_run_end - t0) / 1e9;
    /* Time-bounded: replies during the sending phase over its length. Count-bounded (-n
     * reached): every reply over the time to the last one, drain included. */
    double qps = run_s > 0 ? answered_run / run_s : 0.0;
    if (maxq && sent >= maxq && t_last_answer > t0) qps = answered / ((t_last_answer - t0) / 1e9);
    static const char *rn[16] = {"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP",
                                 "REFUSED", "YXDOMAIN", "YXRRSET", "NXRRSET", "NOTAUTH",
                                 "NOTZONE", "RCODE11", "RCODE12", "RCODE13", "RCODE14", "RCODE15"};
    printf("{\"tool\": \"loadgen\", \"server\": \"%s\", \"port\": %d, \"queries_in_file\": %u, "
           "\"window\": %d, \"batch\": %d, \"sockets\": %d, \"edns\": %s, \"run_s\": %.6f, "
           "\"sent\": %llu, \"answered\": %llu, \"lost\": %llu, \"timeouts\": %llu, "
           "\"unmatched\": %llu, \"mismatched\": %llu, \"send_errors\": %llu, \"refused\": %llu, "
           "\"qps\": %.1f, \"rcodes\": {",
           server, port, nq, window, batch, nsock, edns ? "true" : "false", run_s, sent, answered,
           sent - answered, timeouts, unmatched, mismatched, send_err, refused, qps);
    int first = 1;
    for (int i = 0; i < 16; i++)
        if (rcodes[i]) { printf("%s\"%s\": %llu", first ? "" : ", ", rn[i], rcodes[i]); first = 0; }
    printf("}, \"latency_us\": {\"avg\": %.1f, \"min\": %llu, \"p50\": %.0f, \"p90\": %.0f, "
           "\"p99\": %.0f, \"p999\": %.0f, \"max\": %llu}}\n",
           answered ? (double)lat_sum / answered : 0.0,
           (unsigned long long)(answered ? lat_min : 0), pct(answered, 0.50),
           pct(answered, 0.90), pct(answered, 0.99), pct(answered, 0.999),
           (unsigned long long)lat_max);
    return 0;
}
