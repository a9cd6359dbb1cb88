/* uring_connect HOST PORT [DATA]: connect a TCP socket with io_uring (IORING_OP_CONNECT, never the
 * connect() syscall), then write DATA (default "hello") with plain write(). Tests use it to check that
 * connects submitted through io_uring are traced too. Exit 0 on success. */
#include <arpa/inet.h>
#include <liburing.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s IPV4 PORT [DATA]\n", argv[0]);
        return 2;
    }
    const char *data = argc > 3 ? argv[3] : "hello";
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", argv[1]);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }

    struct io_uring ring;
    int ret = io_uring_queue_init(4, &ring, 0);
    if (ret < 0) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-ret));
        return 1;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_connect(sqe, fd, (struct sockaddr *)&addr, sizeof addr);
    ret = io_uring_submit(&ring);
    if (ret < 0) {
        fprintf(stderr, "io_uring_submit: %s\n", strerror(-ret));
        return 1;
    }
    struct io_uring_cqe *cqe;
    ret = io_uring_wait_cqe(&ring, &cqe);
    if (ret < 0) {
        fprintf(stderr, "io_uring_wait_cqe: %s\n", strerror(-ret));
        return 1;
    }
    int res = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
    io_uring_queue_exit(&ring);
    printf("connect=%d\n", res);
    fflush(stdout);
    if (res < 0) {
        fprintf(stderr, "io_uring connect: %s\n", strerror(-res));
        return 1;
    }

    size_t len = strlen(data);
    if (write(fd, data, len) != (ssize_t)len) {
        perror("write");
        return 1;
    }
    close(fd);
    return 0;
}
