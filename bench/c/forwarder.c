/* The floor: the relay's job done minimally in C with recvmmsg/sendmmsg.
 * Client datagram on the public socket -> 22-byte envelope header + datagram -> transceiver.
 * Envelope from the transceiver on the internal socket -> strip header -> client.
 * usage: forwarder PUBLIC_PORT INTERNAL_PORT TRANSCEIVER_PORT   (all on 127.0.0.1) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define HDR 22
#define MAXPKT 2048

static volatile sig_atomic_t running = 1;
static void stop(int sig) { (void)sig; running = 0; }

static int udp(int port) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); exit(1); }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: forwarder PUBLIC INTERNAL TRANSCEIVER\n"); return 2; }
    signal(SIGTERM, stop); signal(SIGINT, stop);
    int pub = udp(atoi(argv[1])), in = udp(atoi(argv[2]));
    struct sockaddr_in tx = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, "127.0.0.1", &tx.sin_addr);

    static unsigned char rbuf[BATCH][MAXPKT], wbuf[BATCH][MAXPKT + HDR];
    struct mmsghdr rmsg[BATCH], wmsg[BATCH];
    struct iovec riov[BATCH], wiov[BATCH];
    struct sockaddr_in src[BATCH], dst[BATCH];
    unsigned long long fwd = 0;
    struct pollfd pfd[2] = {{pub, POLLIN, 0}, {in, POLLIN, 0}};
    while (running) {
        if (poll(pfd, 2, 200) <= 0) continue;
        for (int side = 0; side < 2; side++) {
            if (!(pfd[side].revents & POLLIN)) continue;
            for (int i = 0; i < BATCH; i++) {
                riov[i] = (struct iovec){rbuf[i], MAXPKT};
                rmsg[i].msg_hdr = (struct msghdr){.msg_name = &src[i], .msg_namelen = sizeof src[i],
                                                  .msg_iov = &riov[i], .msg_iovlen = 1};
            }
            int n = recvmmsg(pfd[side].fd, rmsg, BATCH, MSG_DONTWAIT, NULL);
            if (n <= 0) continue;
            int m = 0;
            for (int i = 0; i < n; i++) {
                unsigned len = rmsg[i].msg_len;
                if (side == 0) {  /* client -> transceiver: prepend the envelope */
                    unsigned char *h = wbuf[m];
                    h[0] = 'V'; h[1] = 'R'; h[2] = 1; h[3] = 4;
                    memcpy(h + 4, &src[i].sin_port, 2);
                    memset(h + 6, 0, 10); h[16] = 0xff; h[17] = 0xff;
                    memcpy(h + 18, &src[i].sin_addr, 4);
                    memcpy(h + HDR, rbuf[i], len);
                    wiov[m] = (struct iovec){h, len + HDR};
                    dst[m] = tx;
                } else {  /* transceiver -> client: strip it */
                    if (len < HDR || rbuf[i][0] != 'V' || rbuf[i][1] != 'R') continue;
                    dst[m] = (struct sockaddr_in){.sin_family = AF_INET};
                    memcpy(&dst[m].sin_port, rbuf[i] + 4, 2);
                    memcpy(&dst[m].sin_addr, rbuf[i] + 18, 4);
                    wiov[m] = (struct iovec){rbuf[i] + HDR, len - HDR};
                }
                wmsg[m].msg_hdr = (struct msghdr){.msg_name = &dst[m], .msg_namelen = sizeof dst[m],
                                                  .msg_iov = &wiov[m], .msg_iovlen = 1};
                m++;
            }
            int sent = 0;
            while (sent < m) {
                int k = sendmmsg(side == 0 ? in : pub, wmsg + sent, m - sent, 0);
                if (k <= 0) break;
                sent += k;
            }
            fwd += sent;
        }
    }
    fprintf(stderr, "forwarded %llu\n", fwd);
    return 0;
}
