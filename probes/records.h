/* Records sent from the probes to userspace through the ring buffer.
 * This header is the one definition of the binary layout; tracer/decoding.py
 * mirrors it and tests/kernel checks that both agree. */
#ifndef EPTRACE_RECORDS_H
#define EPTRACE_RECORDS_H

#define COMM_LEN 16
#define PATH_LEN 256
#define ARGS_LEN 1024   /* argv bytes kept per exec, NUL-separated */
#define ARG_CHUNK 256   /* longest single argument read; slack after ARGS_LEN */
#define MAX_ARGS 32

enum record_type {
    REC_SOCKET_CREATED = 1,
    REC_CONNECT = 2,          /* connect() seen by cgroup/connect4/6 */
    REC_CONNECT_RESULT = 3,   /* the connect syscall returned */
    REC_UDP_SENT = 4,         /* first datagram to a new destination */
    REC_LISTENING = 5,        /* TCP listen() or UDP bind() to a port */
    REC_ESTABLISHED = 6,      /* active TCP handshake done */
    REC_ACCEPTED = 7,         /* passive TCP handshake done */
    REC_FLOW_ENDED = 8,       /* TCP reached CLOSE, or a UDP socket was released */
    REC_PROCESS_FORKED = 9,
    REC_PROCESS_ARGS = 10,    /* argv at execve() entry */
    REC_PROCESS_EXEC = 11,
    REC_PROCESS_EXITED = 12,
    REC_PAYLOAD = 13,         /* the first bytes of a flow in one direction; every DNS query */
    REC_FLOW_UPDATE = 14,     /* counters of an active flow, at most once per update interval */
    REC_STDIO_DUP = 15,       /* dup2/dup3 onto fd 0, 1 or 2: parent_tgid = old fd, child_pid = new fd */
    REC_BURST = 16,           /* data one way after a silence or a turn: relay timing */
    REC_ICMP_ECHO = 17,       /* echo requests to one destination carried data (see struct icmp_record) */
};

/* Who did it: true at task-context hooks, copied from socket storage elsewhere. */
struct owner {
    __u64 cgroup_id;          /* the task's (or socket's) own cgroup */
    __u64 episode_cgroup_id;  /* the registered episode cgroup it lies under */
    __u32 tgid;
    __u32 pid;
    char comm[COMM_LEN];
};

struct record_header {
    __u32 type;
    __u32 size;               /* whole record, header included */
    __u64 ts_ns;              /* CLOCK_MONOTONIC */
    __u64 cookie;             /* socket cookie, 0 for process records */
    struct owner owner;
};

struct endpoints {
    __u8 saddr[16];           /* IPv4 in the first 4 bytes */
    __u8 daddr[16];
    __u16 sport;              /* host byte order */
    __u16 dport;
    __u16 family;             /* AF_INET / AF_INET6 */
    __u8 protocol;            /* IPPROTO_* */
    __u8 socktype;            /* SOCK_STREAM, SOCK_DGRAM, SOCK_RAW... */
};

struct counters {
    __u64 bytes_out;          /* payload bytes, sandbox -> peer */
    __u64 bytes_in;
    __u64 packets_out;
    __u64 packets_in;
};

/* socket_record.family of a socket asked for through io_uring (IORING_OP_SOCKET): no hook shows its family. */
#define SOCKET_FAMILY_IO_URING 0xffff

struct socket_record {        /* REC_SOCKET_CREATED */
    struct record_header h;
    __u32 family;
    __u32 type;
    __u32 protocol;
    __s32 ret;                /* socket() result when seen at the syscall; -EPERM: refused by the policy */
};

/* When a flow talks: enough to tell keep-alive cadence and who speaks first. */
#define GAP_BUCKETS 8
struct activity {
    __u64 last_ns;            /* the last data packet, either way (to a tick: packets.c's coarse clock) */
    __u32 exchanges_out;      /* bursts after >= 1 s of silence that the sandbox started */
    __u32 exchanges_in;       /* ... that the peer started */
    __u16 gaps[GAP_BUCKETS];  /* those silences by length: [1,2) [2,4) ... [64,128) >=128 s */
};

struct net_record {           /* CONNECT, UDP_SENT, LISTENING, ESTABLISHED, ACCEPTED, FLOW_UPDATE, FLOW_ENDED */
    struct record_header h;
    struct endpoints ep;
    struct counters c;
    struct activity a;
    __u64 start_ns;           /* when the socket's flow began (FLOW_ENDED) */
    __u32 flags;              /* FLOW_* */
    __s32 ret;                /* CONNECT_RESULT: syscall return; FLOW_DENIED: POLICY_* or the entry */
};

#define FLOW_INITIATED   1    /* the sandbox connected out */
#define FLOW_ESTABLISHED 2    /* the handshake completed */
#define FLOW_ACCEPTED    4    /* inbound connection to a sandbox listener */
#define FLOW_FAILED      8    /* closed before it was established */
#define FLOW_DENIED      16   /* CONNECT, UDP_SENT, ACCEPTED: the episode's policy refused it; ret: the deciding entry */

/* net_record.ret of a FLOW_DENIED record: the index of the policy entry that refused it (>= 0), or */
#define POLICY_DEFAULT   -1   /* no entry matched: the policy's default */
#define POLICY_CONTAINED -2   /* the episode is contained (deny_network) */
#define POLICY_LISTEN    -4   /* ACCEPTED: listen = "local" or "none" dropped the connection's SYN */
#define POLICY_CUT       -5   /* a destination denied by on_alert = "cut" (the rule's entry in the LPM tries) */

#define PAYLOAD_LEN 256
#define PAYLOAD_PACKETS 2     /* data packets captured per direction of a flow */
struct payload_record {       /* REC_PAYLOAD */
    struct record_header h;
    struct endpoints ep;
    __u32 len;                /* bytes in data */
    __u32 total;              /* payload bytes of the packet */
    __u8 egress;              /* 1: sandbox -> peer */
    __u8 index;               /* 0 for the first data packet this way, 1 for the second... */
    __u8 pad[6];
    __u8 data[PAYLOAD_LEN];
};

/* A burst: the first data packet one way after >= BURST_IDLE_NS of silence
 * that way, or after the other side sent data (a turn, on flows to the outside
 * only), or the first data that way. Relay correlation needs when each exchange starts and how big it is;
 * one record per burst, never per packet (a bulk transfer is one burst: its
 * ACKs carry no data). */
#define BURST_IDLE_NS 200000000ULL
struct burst_record {         /* REC_BURST; h.ts_ns: the burst's first packet */
    struct record_header h;
    __u64 idle_ns;            /* the silence before it this way, to a tick (packets.c's coarse clock); 0: the first data */
    __u32 bytes;              /* payload bytes of that first packet */
    __u8 egress;              /* 1: sandbox -> peer */
    __u8 protocol;            /* IPPROTO_* */
    __u8 pad[2];
};

struct process_record {       /* FORKED, ARGS, EXEC, EXITED, STDIO_DUP */
    struct record_header h;
    __u32 parent_tgid;        /* FORKED: the parent; EXEC: old pid */
    __u32 child_pid;          /* FORKED; ARGS: ARGV_* flags; EXEC: EXEC_HELD */
    __s32 exit_code;          /* EXITED, when known */
    __u32 data_len;
    char data[ARGS_LEN + ARG_CHUNK]; /* ARGS: argv NUL-separated; EXEC: filename */
};

/* ICMP echo requests of one episode to one destination, summed in the kernel
 * (packets.c). An echo carries data when its payload (after the first
 * ICMP_STAMP_LEN bytes if they look like ping's timestamp) differs from the
 * previous echo's, or when it is the first and at least the large-payload setting.
 * Sent at the first data echoes (1..ICMP_REPORT_ALL), then at powers of two. */
#define ICMP_STAMP_LEN 16
#define ICMP_DIGEST_LEN 1536      /* payload bytes digested; a longer echo always counts as data */
#define ICMP_REPORT_ALL 16
struct icmp_record {          /* REC_ICMP_ECHO */
    struct record_header h;
    struct endpoints ep;      /* daddr: the echo's destination; protocol: IPPROTO_ICMP or ICMPV6 */
    __u64 first_ns;           /* the first echo to this destination */
    __u64 data_bytes;         /* payload bytes of the data echoes */
    __u32 echoes;             /* echo requests in all */
    __u32 data_echoes;        /* ... that carried data */
    __u32 largest;            /* the largest payload, bytes */
    __u32 payload;            /* this echo's payload, bytes */
};

/* ARGS: how the kernel read argv (in process_record.child_pid). */
#define ARGV_FAILED 1         /* a read faulted: the strings are on pages not yet in memory */
#define ARGV_CUT    2         /* more than MAX_ARGS arguments, ARGS_LEN bytes or ARG_CHUNK in one */
/* EXEC (in process_record.child_pid): the new program was stopped (SIGSTOP) before its first
 * instruction because its argv was not read whole; userspace reads /proc/<pid>/cmdline, then resumes it. */
#define EXEC_HELD   1

/* Why something was not recorded, counted tracer-wide (per CPU) and per episode. */
enum loss_reason {
    LOST_RINGBUF_FULL = 0,        /* the ring buffer had no room */
    LOST_NO_STORAGE = 1,          /* socket-local storage could not be created */
    LOST_BUDGET = 2,              /* a low-value record over its episode's budget */
    LOST_ARGV_UNREAD = 3,         /* an exec's argv not read whole (userspace then asks /proc) */
    LOST_CONNECTS_MAP_FULL = 4,   /* no connects_in_flight storage for the thread: its result goes unreported */
    LOST_EXIT_CODES_MAP_FULL = 5, /* exit_codes full: an exit status is unknown */
    LOST_SOCKETS_MAP_FULL = 6,    /* sockets_in_flight full: an unusual socket goes unreported */
    LOST_ARGV_MAP_FULL = 7,       /* argv_unread full: an exec with unread argv is not held */
    LOST_BURST_BUDGET = 8,        /* a burst over its episode's burst budget (BURSTS_PER_SECOND) */
    LOST_RING_SHARE = 9,          /* the ring buffer was above its watermark and the episode had used its share */
    LOSS_REASONS = 10,
};

struct token_bucket {
    __s64 tokens;             /* records it may still send */
    __u64 refill_ns;          /* when tokens were last refilled */
};

/* One per traced episode, created by userspace when it attaches the episode (the
 * probes only look it up, so it cannot fill up): its losses and its two buckets. */
struct episode_account {
    __u64 lost[LOSS_REASONS];
    struct token_bucket budget;   /* low-value records, always */
    struct token_bucket share;    /* every record, while the ring buffer is above its watermark */
};

#endif
