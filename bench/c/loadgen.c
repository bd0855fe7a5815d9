/* Load generator for the forwarding benchmarks, cheap per packet: sendmmsg/recvmmsg batches.
 *
 * usage: loadgen MODE PORT NSOCK RATE SECONDS PAYLOAD FIRSTFILE
 *   MODE     flood: RATE packets/s spread over NSOCK client sockets for SECONDS;
 *            ping:  one request outstanding at a time on socket 0, for SECONDS.
 *   FIRSTFILE  "-" or a file of NSOCK records (u16 little-endian length + bytes): each socket's
 *            first packet (a STUN Binding request with a routing token for the relay); a reply
 *            to it is awaited before the load starts.
 * Prints one JSON line: sent, received, loss, rtt percentiles (us), own CPU us per packet. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define MAXSOCK 1024
#define MAXRTT 4000000

static uint64_t now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}
static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b; return x < y ? -1 : x > y;
}
static double cpu_s(void) {
    struct rusage r; getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

static int nsock, fds[MAXSOCK];
static uint64_t *rtts; static size_t nrtt;
static unsigned long long received;

/* Receive whatever arrives within timeout_ns (0: only what is queued); sleeps in ppoll. */
static void drain(uint64_t timeout_ns) {
    struct pollfd pfd[MAXSOCK];
    for (int i = 0; i < nsock; i++) pfd[i] = (struct pollfd){fds[i], POLLIN, 0};
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull)};
    if (ppoll(pfd, nsock, &ts, NULL) <= 0) return;
    static unsigned char buf[BATCH][2048];
    struct mmsghdr msg[BATCH]; struct iovec iov[BATCH];
    uint64_t t = now_ns();
    for (int s = 0; s < nsock; s++) {
        if (!(pfd[s].revents & POLLIN)) continue;
        for (;;) {
            for (int i = 0; i < BATCH; i++) {
                iov[i] = (struct iovec){buf[i], sizeof buf[i]};
                msg[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
            }
            int n = recvmmsg(fds[s], msg, BATCH, MSG_DONTWAIT, NULL);
            if (n <= 0) break;
            for (int i = 0; i < n; i++) {
                if (msg[i].msg_len < 9 || buf[i][0] != 0x80) continue;
                received++;
                uint64_t sent; memcpy(&sent, buf[i] + 1, 8);
                if (nrtt < MAXRTT && t > sent) rtts[nrtt++] = t - sent;
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 8) { fprintf(stderr, "usage: loadgen MODE PORT NSOCK RATE SECONDS PAYLOAD FIRSTFILE\n"); return 2; }
    int ping = strcmp(argv[1], "ping") == 0;
    int port = atoi(argv[2]); nsock = atoi(argv[3]);
    double rate = atof(argv[4]), seconds = atof(argv[5]);
    int payload = atoi(argv[6]);
    if (nsock < 1 || nsock > MAXSOCK || payload < 9 || payload > 1400) { fprintf(stderr, "bad args\n"); return 2; }
    rtts = malloc(sizeof(uint64_t) * MAXRTT);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    for (int i = 0; i < nsock; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        int size = 4 << 20;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
        setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
        struct sockaddr_in a = {.sin_family = AF_INET};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        bind(fds[i], (struct sockaddr *)&a, sizeof a);
        connect(fds[i], (struct sockaddr *)&dst, sizeof dst);
    }
    if (strcmp(argv[7], "-") != 0) {  /* open each flow and wait for its answer */
        FILE *f = fopen(argv[7], "rb");
        if (!f) { perror("first packets"); return 1; }
        for (int i = 0; i < nsock; i++) {
            unsigned char len2[2], pkt[2048];
            if (fread(len2, 1, 2, f) != 2) { fprintf(stderr, "short first-packet file\n"); return 1; }
            unsigned len = len2[0] | len2[1] << 8;
            if (len > sizeof pkt || fread(pkt, 1, len, f) != len) { fprintf(stderr, "bad record\n"); return 1; }
            unsigned char reply[2048];
            for (int attempt = 0;; attempt++) {
                send(fds[i], pkt, len, 0);
                struct pollfd p = {fds[i], POLLIN, 0};
                if (poll(&p, 1, 200) > 0 && recv(fds[i], reply, sizeof reply, 0) > 0) break;
                if (attempt == 10) { fprintf(stderr, "no answer to socket %d's first packet\n", i); return 1; }
            }
        }
        fclose(f);
    }
    unsigned char pkt[1500]; memset(pkt, 0x55, sizeof pkt); pkt[0] = 0x80;
    unsigned long long sent = 0;
    double cpu0 = cpu_s();
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    if (ping) {
        while (now_ns() < end) {
            uint64_t t = now_ns(); memcpy(pkt + 1, &t, 8);
            send(fds[0], pkt, payload, 0); sent++;
            unsigned long long before = received;
            uint64_t give_up = now_ns() + 100000000ull;
            for (uint64_t t1; received == before && (t1 = now_ns()) < give_up;) drain(give_up - t1);
        }
    } else {
        const uint64_t tick = 2000000ull;  /* 2 ms */
        double due = 0; uint64_t next = start;
        struct mmsghdr msg[BATCH]; struct iovec iov[BATCH];
        int sock = 0;
        while (now_ns() < end) {
            due += rate * tick / 1e9;
            int todo = (int)due; due -= todo;
            while (todo > 0) {  /* one sendmmsg batch per socket, round robin */
                int n = todo < BATCH ? todo : BATCH;
                if (n > 8 && nsock > 1) n = 8;
                uint64_t t = now_ns(); memcpy(pkt + 1, &t, 8);
                for (int i = 0; i < n; i++) {
                    iov[i] = (struct iovec){pkt, (size_t)payload};
                    msg[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
                }
                int k = sendmmsg(fds[sock], msg, n, MSG_DONTWAIT);
                if (k > 0) sent += k;
                todo -= n; sock = (sock + 1) % nsock;
            }
            next += tick;
            for (uint64_t t1; (t1 = now_ns()) < next;) drain(next - t1);
        }
        uint64_t settle = now_ns() + 500000000ull;
        for (uint64_t t1; (t1 = now_ns()) < settle;) drain(settle - t1);
    }
    double cpu = cpu_s() - cpu0, elapsed = (now_ns() - start) / 1e9;
    qsort(rtts, nrtt, sizeof *rtts, cmp);
#define PCT(p) (nrtt ? rtts[(size_t)((p) * (nrtt - 1))] / 1000.0 : -1.0)
    printf("{\"sent\": %llu, \"received\": %llu, \"loss\": %.6f, \"seconds\": %.3f, "
           "\"rtt_p50_us\": %.1f, \"rtt_p99_us\": %.1f, \"rtt_p999_us\": %.1f, "
           "\"generator_cpu_us_per_packet\": %.3f}\n",
           sent, received, sent ? 1.0 - (double)received / sent : 0.0, elapsed,
           PCT(0.50), PCT(0.99), PCT(0.999), sent ? cpu * 1e6 / (sent + received) : 0.0);
    return 0;
}
