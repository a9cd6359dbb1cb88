/* Exec a program with its argv strings on file-backed pages this process never touched, as a
 * sandbox hiding its command line from the tracer would: the kernel-side read at execve() entry
 * faults and fails (BPF cannot page in), while the exec itself works (the kernel copies argv in).
 *
 * Usage: hidden_argv FILE OFFSET...   argv[i] = the NUL-terminated string at OFFSET in FILE. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s FILE OFFSET...\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(argv[1]);
        return 2;
    }
    /* Mapped, never read here: no page of it is present in this process. */
    char *base = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    int n = argc - 2;
    char **args = calloc(n + 1, sizeof(char *));
    for (int i = 0; i < n; i++)
        args[i] = base + strtol(argv[i + 2], NULL, 10);
    char *envp[] = {"PATH=/usr/bin:/bin", NULL};
    execve(args[0], args, envp);
    perror("execve");
    return 127;
}
