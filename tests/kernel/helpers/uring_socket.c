/* uring_socket: ask for a packet socket (AF_PACKET, SOCK_RAW) through io_uring (IORING_OP_SOCKET), never
 * the socket() syscall. Prints "socket=FD" or "socket=-ERRNO" and exits 0. Tests use it to check that a
 * socket asked for this way is seen, and refused where packet sockets are. With the argument "sqpoll"
 * the ring is set up with IORING_SETUP_SQPOLL: the request is submitted by the ring's kernel thread. */
#include <arpa/inet.h>
#include <liburing.h>
#include <linux/if_ether.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
    struct io_uring ring;
    struct io_uring_params params;
    memset(&params, 0, sizeof(params));
    if (argc > 1 && strcmp(argv[1], "sqpoll") == 0) {
        params.flags = IORING_SETUP_SQPOLL;
        params.sq_thread_idle = 1000;
    }
    int ret = io_uring_queue_init_params(4, &ring, &params);
    if (ret < 0) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-ret));
        return 1;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_socket(sqe, AF_PACKET, SOCK_RAW, htons(ETH_P_ALL), 0);
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
    printf("socket=%d\n", cqe->res);
    io_uring_cqe_seen(&ring, cqe);
    io_uring_queue_exit(&ring);
    return 0;
}
