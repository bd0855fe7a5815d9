/* A UDP echo that costs next to nothing: recvmmsg a batch, sendmmsg it back to each sender.
 * Stands in for the transceiver (echoes envelopes unchanged) and for the direct path.
 * usage: sink PORT */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#define BATCH 64
#define MAXPKT 2048
static volatile sig_atomic_t running = 1;
static void stop(int sig) { (void)sig; running = 0; }

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: sink PORT\n"); return 2; }
    signal(SIGTERM, stop); signal(SIGINT, stop);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    static unsigned char buf[BATCH][MAXPKT];
    struct mmsghdr msg[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in src[BATCH];
    struct pollfd pfd = {fd, POLLIN, 0};
    while (running) {
        if (poll(&pfd, 1, 200) <= 0) continue;
        for (int i = 0; i < BATCH; i++) {
            iov[i] = (struct iovec){buf[i], MAXPKT};
            msg[i].msg_hdr = (struct msghdr){.msg_name = &src[i], .msg_namelen = sizeof src[i],
                                             .msg_iov = &iov[i], .msg_iovlen = 1};
        }
        int n = recvmmsg(fd, msg, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        for (int i = 0; i < n; i++) iov[i].iov_len = msg[i].msg_len;
        int sent = 0;
        while (sent < n) { int k = sendmmsg(fd, msg + sent, n - sent, 0); if (k <= 0) break; sent += k; }
    }
    return 0;
}
