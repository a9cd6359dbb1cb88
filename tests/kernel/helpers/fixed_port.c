/* LD_PRELOAD shim for the Kafka tests: the first bind() of an AF_INET socket to port 0 gets port
 * $FIXED_PORT instead (with SO_REUSEADDR), so that librdkafka's mock cluster, which always binds its
 * broker to an ephemeral port, comes back on the same port when the test restarts it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    static int used;
    if (!real_bind)
        real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    const char *want = getenv("FIXED_PORT");
    if (want && !used && addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)
        && ((const struct sockaddr_in *)addr)->sin_port == 0) {
        struct sockaddr_in fixed = *(const struct sockaddr_in *)addr;
        int one = 1;
        used = 1;
        fixed.sin_port = htons((unsigned short)atoi(want));
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        return real_bind(fd, (const struct sockaddr *)&fixed, sizeof fixed);
    }
    return real_bind(fd, addr, len);
}
