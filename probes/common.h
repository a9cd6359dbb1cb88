/* Maps and helpers shared by every probe file. */
#ifndef EPTRACE_COMMON_H
#define EPTRACE_COMMON_H

#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include "records.h"

/* Stable ABI values (linux/net.h is not a UAPI header). */
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOCK_RAW 3
#endif

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 8192
#endif
#define MAX_CGROUP_LEVEL 32

/* Every map is pinned under PIN_DIR (a bpffs directory, set by the loader) so that
 * a restarted tracer re-opens them, and programs left attached by a dead tracer
 * keep recording into the same ring buffer. bcc opens the pin when it exists and
 * creates and pins the map when it does not. */
#ifdef PIN_DIR
#define PINNED(type, name) type ":" PIN_DIR "/" #name
#else
#define PINNED(type, name) type
#endif

/* Episode cgroups registered by userspace: cgroup id -> 1. */
#define EPISODE_TRACED 1
#define EPISODE_FAIL_CLOSED 2     /* refused while no tracer is alive, whatever the tracer-wide choice */
BPF_F_TABLE(PINNED("hash", episodes), __u64, __u32, episodes, 65536, 0);
/* [0], [1]: shallowest and deepest level of a registered episode cgroup, so
 * the ancestor walk below tries only the levels that can match. */
BPF_F_TABLE(PINNED("array", episode_levels), int, __u32, episode_levels, 2, 0);

/* Each thread's connect() in flight (cookie 0: none); its result is read at syscall exit. Task storage:
 * a lookup in the task, where a hash keyed by thread cost an update and a delete per connect (make bench). */
struct connect_in_flight {
    __u64 cookie;
    __u32 protocol;
    __u32 routine;            /* ROUTINE_*: the result of a refused routine flow is not sent */
};
BPF_F_TABLE(PINNED("task_storage", connects_in_flight), int, struct connect_in_flight, connects_in_flight, 0,
            BPF_F_NO_PREALLOC);

/* The current thread's connect in flight; create: make its storage (the thread's first connect). */
static __always_inline struct connect_in_flight *connect_pending(int create)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    return connects_in_flight.task_storage_get(task, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

/* Settings written by userspace: the flow update interval (ns), the ICMP large payload (bytes), the
 * low-value records each episode may send per second (0: no budget) and how many it may send at once;
 * the ring buffer's watermark (bytes unread; 0: no fairness) and each episode's share above it; the
 * generation of the policies map, bumped after every write to it (packet_policy() in packets.c). */
enum setting { SET_UPDATE_INTERVAL = 0, SET_ICMP_LARGE = 1, SET_BUDGET_RATE = 2, SET_BUDGET_BURST = 3,
               SET_SHARE_WATERMARK = 4, SET_SHARE_RATE = 5, SET_SHARE_BURST = 6, SET_POLICY_GENERATION = 7,
               SETTINGS = 8 };
BPF_F_TABLE(PINNED("array", settings), int, __u64, settings, SETTINGS, 0);

/* BPF_RINGBUF_OUTPUT, with a pin: bcc's macro has no pinned form. */
struct events_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output) (void *, u64, u64);
    void* (*ringbuf_reserve) (u64);
    void (*ringbuf_discard) (void *, u64);
    void (*ringbuf_submit) (void *, u64);
    u64 (*peek) (u64);        /* bpf_ringbuf_query: see ring_unread() */
    u32 max_entries;
};
__attribute__((section("maps/" PINNED("ringbuf", events))))
struct events_table_t events = { .max_entries = RINGBUF_PAGES * PAGE_SIZE };
BPF_F_TABLE(PINNED("percpu_array", lost), int, __u64, lost, LOSS_REASONS, 0);        /* tracer-wide, every loss */
/* episode cgroup id -> its account */
BPF_F_TABLE(PINNED("hash", accounts), __u64, struct episode_account, accounts, 65536, 0);

/* Destinations each episode has already reached: a flow to a new one carries alert
 * evidence and bypasses the budget; one to a known destination is routine. LRU: an
 * eviction only makes a destination new again (more evidence), and loses nothing. */
struct destination {
    __u64 episode;
    __u8 addr[16];
    __u16 port;               /* the peer's port; for an inbound flow, the local (listening) port */
    __u16 family;
    __u8 protocol;
    __u8 inbound;
    __u8 pad[2];
};
BPF_F_TABLE(PINNED("lru_hash", destinations_seen), struct destination, __u8, destinations_seen, 65536, 0);

/* Fail-closed: the tracer writes refreshed_ns (CLOCK_MONOTONIC) several times a
 * second. When timeout_ns is set and the tracer has been silent longer, episode
 * sockets may not connect or send datagrams (EPERM), raw sockets are refused, and
 * the episode's packets to or from other hosts are dropped (its established flows
 * and ping sockets stall) until a tracer is back. */
struct liveness {
    __u64 refreshed_ns;
    __u64 timeout_ns;         /* every episode fails closed after this; 0: only those marked EPISODE_FAIL_CLOSED */
    __u64 episode_timeout_ns; /* the marked ones (run's, the daemon's clients') after this; 0: none */
    __u64 lost_reported;      /* records lost as the tracer last saw them (for the restart report) */
    __u32 tracer_tgid;        /* the tracer's process: its exit (a kill -9 too) is seen at once */
    __u32 tracer_exited;      /* set by sched_process_exit: refuse now, not after the timeout */
};
BPF_F_TABLE(PINNED("array", liveness), int, struct liveness, liveness, 1, 0);
/* episode cgroup id -> connects, sends, raw sockets and packets refused while no tracer was alive */
BPF_F_TABLE(PINNED("hash", refused), __u64, __u64, refused, 65536, 0);

/* Containment (tracer/policy.py writes these; the probes only read them, so that they hold while
 * no tracer runs). An episode without an entry in policies is not restricted: one lookup. */
#define LISTEN_ANY 0
#define LISTEN_LOCAL 1
#define LISTEN_NONE 2
struct episode_policy {
    __u8 default_deny;        /* no entry matched: refuse */
    __u8 raw_sockets;         /* 1: raw sockets allowed */
    __u8 listen;              /* LISTEN_*: who may connect to the episode's TCP listeners */
    __u8 contained;           /* deny_network: every connect, send and packet of the episode is refused */
    __u8 names;               /* it has host-name entries: its DNS answers are read (packets.c) */
    __u8 cut;                 /* on_alert = "cut" cut some of its flows: their packets are dropped (cut_flows) */
    __u8 pad[2];
};
BPF_F_TABLE(PINNED("hash", policies), __u64, struct episode_policy, policies, 65536, 0);
/* episode cgroup id -> connects, sends, sockets and inbound connections the policy refused */
BPF_F_TABLE(PINNED("hash", denied), __u64, __u64, denied, 65536, 0);
/* on_alert = "cut": socket cookie of a cut flow -> its episode. Read only when the episode's cut is set. */
BPF_F_TABLE(PINNED("hash", cut_flows), __u64, __u64, cut_flows, 65536, 0);
/* Inbound connections a listener refused, already reported: (episode, source address, listening port). */
BPF_F_TABLE(PINNED("lru_hash", refusals_seen), struct destination, __u8, refusals_seen, 16384, 0);

/* The rules of one prefix, with those of every shorter prefix that covers it (userspace folds
 * them in, deny rules first), so that the longest match alone decides: deny wins. */
#define POLICY_RULES 16
struct policy_rule {
    __u16 port_lo;            /* 0-0: any port */
    __u16 port_hi;
    __u8 protocol;            /* 0: any */
    __u8 deny;
    __s16 entry;              /* the entry's index in the policy, for the alert */
    __u32 expires_s;          /* an address a DNS answer gave for a host-name entry: until then (0: always) */
};
struct policy_rules {
    __u32 n;
    struct policy_rule r[POLICY_RULES];
};
/* LPM keys: the episode (all 64 bits always match), then the address. */
struct policy_key4 {
    __u32 prefixlen;
    __u32 episode_hi;
    __u32 episode_lo;
    __u8 addr[4];
};
struct policy_key6 {
    __u32 prefixlen;
    __u32 episode_hi;
    __u32 episode_lo;
    __u8 addr[16];
};
BPF_F_TABLE(PINNED("lpm_trie", policy4), struct policy_key4, struct policy_rules, policy4, 65536, BPF_F_NO_PREALLOC);
BPF_F_TABLE(PINNED("lpm_trie", policy6), struct policy_key6, struct policy_rules, policy6, 65536, BPF_F_NO_PREALLOC);

/* Host-name entries: (episode, hash of a name in DNS wire format, lowercased, from one of its labels on,
 * wildcard) -> the rule its answered addresses get. wildcard 1: "*.NAME", matched by strict subdomains. */
struct dns_name_key {
    __u64 episode;
    __u64 hash;
    __u64 wildcard;
};
BPF_F_TABLE(PINNED("hash", dns_names), struct dns_name_key, struct policy_rule, dns_names, 65536, 0);

static __always_inline int rules_refuse(struct policy_rules *rules, __u16 port, __u8 protocol,
                                        struct episode_policy *p, __s32 *entry)
{
    if (rules) {
        for (int i = 0; i < POLICY_RULES; i++) {
            if (i >= rules->n)
                break;
            struct policy_rule *r = &rules->r[i];
            if (r->protocol && r->protocol != protocol)
                continue;
            if (r->port_hi && (port < r->port_lo || port > r->port_hi))
                continue;
            if (r->expires_s && bpf_ktime_get_ns() / 1000000000ULL > r->expires_s)
                continue;
            *entry = r->entry;
            return r->deny;
        }
    }
    *entry = POLICY_DEFAULT;
    return p->default_deny;
}

/* Does the episode's policy refuse this destination? addr: 4 or 16 bytes (family). Loopback
 * and the unspecified address (which reaches the host itself) are the episode's own business. */
static __always_inline int policy_refuses(__u64 episode, __u16 family, const __u8 *addr, __u16 port,
                                          __u8 protocol, __s32 *entry)
{
    struct episode_policy *p = policies.lookup(&episode);
    if (!p)
        return 0;
    if (p->contained) {
        *entry = POLICY_CONTAINED;
        return 1;
    }
    const __u8 *v4 = 0;
    if (family == AF_INET) {
        v4 = addr;
    } else {
        __u32 w[4];
        __builtin_memcpy(w, addr, 16);
        if (w[0] == 0 && w[1] == 0 && (w[2] == 0 || w[2] == bpf_htonl(0xffff))) {
            if (w[2] == 0 && (w[3] == 0 || w[3] == bpf_htonl(1)))
                return 0;                           /* :: and ::1 */
            if (w[2])
                v4 = addr + 12;                     /* ::ffff:a.b.c.d is IPv4 to the kernel */
        }
    }
    if (v4) {
        if (v4[0] == 127 || (v4[0] | v4[1] | v4[2] | v4[3]) == 0)
            return 0;
        struct policy_key4 k = {.prefixlen = 64 + 32, .episode_hi = episode >> 32, .episode_lo = (__u32)episode};
        __builtin_memcpy(k.addr, v4, 4);
        return rules_refuse(policy4.lookup(&k), port, protocol, p, entry);
    }
    struct policy_key6 k = {.prefixlen = 64 + 128, .episode_hi = episode >> 32, .episode_lo = (__u32)episode};
    __builtin_memcpy(k.addr, addr, 16);
    return rules_refuse(policy6.lookup(&k), port, protocol, p, entry);
}

/* Is the episode contained (deny_network)? For its packets, in cgroup_skb. */
static __always_inline struct episode_policy *episode_policy(__u64 episode)
{
    return policies.lookup(&episode);
}

/* Per-socket state: the owner, recorded in task context, plus flow counters.
 * BPF_F_CLONE lets an accepted socket inherit its listener's owner. */
struct sock_state {
    struct owner owner;
    struct endpoints ep;
    struct counters c;
    struct activity a;
    __u64 start_ns;
    __u64 last_update_ns;     /* the last REC_FLOW_UPDATE */
    __u64 update_interval_ns; /* settings[SET_UPDATE_INTERVAL] as this flow last read it */
    __u64 burst_out_ns;       /* the last data packet out, and in: bursts start after BURST_IDLE_NS */
    __u64 burst_in_ns;
    __u64 packet_policy;      /* the episode's policy as its packets need it (packets.c: packet_policy) */
    __u32 flags;
    __u8 captured_out;        /* data packets captured this way (PAYLOAD_PACKETS at most) */
    __u8 captured_in;
    __u8 routine;             /* ROUTINE_*: a flow to a destination its episode reached before */
    __u8 data_last_out;       /* the flow's last data packet went out (packets.c: note_burst's turns) */
};
BPF_F_TABLE(PINNED("sk_storage", sockets), int, struct sock_state, sockets, 0,
            BPF_F_NO_PREALLOC | BPF_F_CLONE);

/* Count a loss tracer-wide and, when the episode is known, in its account. */
static __always_inline void count_lost(__u64 episode, __u32 reason)
{
    __u32 key = reason;             /* reason itself stays a constant the verifier can see */
    __u64 *n = lost.lookup(&key);
    if (n)
        (*n)++;
    if (!episode || reason >= LOSS_REASONS)
        return;
    struct episode_account *a = accounts.lookup(&episode);
    if (a)
        __sync_fetch_and_add(&a->lost[reason], 1);
}

#define BUDGET_REFILL_NS 1000000ULL          /* refill at most once a millisecond */
#define BUDGET_MAX_ELAPSED_NS 10000000000ULL /* keeps elapsed * rate far from overflow */

/* Take n tokens from a bucket that refills rate a second up to burst. Updates from several
 * CPUs may race: the bucket is approximate, never unbounded. */
static __always_inline int take_tokens(struct token_bucket *b, __u64 rate, __u64 burst, __s64 n)
{
    __u64 now = bpf_ktime_get_ns();
    __u64 elapsed = now - b->refill_ns;
    if (elapsed >= BUDGET_REFILL_NS) {
        if (elapsed > BUDGET_MAX_ELAPSED_NS)
            elapsed = BUDGET_MAX_ELAPSED_NS;
        __s64 tokens = b->tokens + (__s64)(elapsed * rate / 1000000000ULL);
        if (tokens > (__s64)burst)
            tokens = burst;
        b->tokens = tokens;
        b->refill_ns = now;
    }
    if (b->tokens < n)
        return 0;
    __sync_fetch_and_add(&b->tokens, -n);
    return 1;
}

/* May the episode send n more low-value records? A token bucket per episode, so that one
 * episode's flood of routine records cannot fill the ring buffer that every episode shares. */
static __always_inline int take_budget(__u64 episode, __s64 n)
{
    __u32 k_rate = SET_BUDGET_RATE, k_burst = SET_BUDGET_BURST;
    __u64 *rate = settings.lookup(&k_rate), *burst = settings.lookup(&k_burst);
    if (!rate || !burst || !*rate)
        return 1;
    struct episode_account *a = accounts.lookup(&episode);
    if (!a)
        return 1;                           /* not an episode this tracer accounts for */
    return take_tokens(&a->budget, *rate, *burst, n);
}

/* Bytes in the ring buffer that the reader has not consumed yet. bcc 0.26 has no ringbuf_query
 * in its rewriter: events.peek(FLAGS) is rewritten to bpf_map_peek_elem(<the map>, FLAGS), which
 * this macro, scoped to this function, turns into bpf_ringbuf_query. */
static __always_inline __u64 ring_unread(void)
{
#define bpf_map_peek_elem(map, flags) bpf_ringbuf_query(map, flags)
    return events.peek(BPF_RB_AVAIL_DATA);
#undef bpf_map_peek_elem
}

/* Fairness among episodes for every record, evidence too. Below the watermark nothing is refused
 * and nothing is paid: one helper call and one array lookup. Above it, each record is paid from its
 * episode's share (a token bucket, full while the episode was quiet), so that an episode that keeps
 * flooding is refused while the room left above the watermark stays for the episodes that do not.
 * A refused record is the flooding episode's own loss (LOST_RING_SHARE), counted in its account. */
static __always_inline int within_ring_share(__u64 episode)
{
    __u32 k_mark = SET_SHARE_WATERMARK;
    __u64 *mark = settings.lookup(&k_mark);
    if (!episode || !mark || !*mark || ring_unread() < *mark)
        return 1;
    __u32 k_rate = SET_SHARE_RATE, k_burst = SET_SHARE_BURST;
    __u64 *rate = settings.lookup(&k_rate), *burst = settings.lookup(&k_burst);
    struct episode_account *a = accounts.lookup(&episode);
    if (!rate || !burst || !a || take_tokens(&a->share, *rate, *burst, 1))
        return 1;
    count_lost(episode, LOST_RING_SHARE);
    return 0;
}

/* One low-value record: sent, or refused and counted. */
static __always_inline int within_budget(__u64 episode)
{
    if (take_budget(episode, 1))
        return 1;
    count_lost(episode, LOST_BUDGET);
    return 0;
}

/* A flow's records go or stay together: a routine flow is admitted whole when it starts (its
 * lifecycle records paid for at once) or refused whole, so that userspace never holds half a
 * flow. Each record of a refused flow is counted as it is suppressed. */
#define ROUTINE_NO 0          /* a flow to a new destination: evidence, never budgeted */
#define ROUTINE_PAID 1        /* routine, admitted: its lifecycle records are paid for */
#define ROUTINE_REFUSED 2     /* routine, over the budget: none of its records is sent */
#define TCP_OUT_RECORDS 3     /* CONNECT, ESTABLISHED (or CONNECT_RESULT), FLOW_ENDED */
#define TCP_IN_RECORDS 2      /* ACCEPTED, FLOW_ENDED */
#define UDP_RECORDS 2         /* UDP_SENT, FLOW_ENDED */

static __always_inline __u8 admit_flow(__u64 episode, int known, __s64 records)
{
    if (!known)
        return ROUTINE_NO;
    return take_budget(episode, records) ? ROUTINE_PAID : ROUTINE_REFUSED;
}

/* May a record of this flow go out? A refused flow's record counts as one more loss. */
static __always_inline int flow_admitted(__u64 episode, __u8 routine)
{
    if (routine != ROUTINE_REFUSED)
        return 1;
    count_lost(episode, LOST_BUDGET);
    return 0;
}

/* Has the episode reached this destination before? Remembers it if not. */
static __always_inline int known_destination(struct destination *d)
{
    if (destinations_seen.lookup(d))
        return 1;
    __u8 one = 1;
    destinations_seen.update(d, &one);      /* an LRU: a failure only means "new" next time too */
    return 0;
}

/* Reserve a record within the episode's ring share, counting a failure as a loss. One function per record
 * type: the size must be a constant, and bcc does not expand map calls in macros. */
static __always_inline struct net_record *reserve_net(__u64 episode)
{
    if (!within_ring_share(episode))
        return 0;
    struct net_record *r = events.ringbuf_reserve(sizeof(struct net_record));
    if (!r)
        count_lost(episode, LOST_RINGBUF_FULL);
    return r;
}

static __always_inline struct socket_record *reserve_socket(__u64 episode)
{
    if (!within_ring_share(episode))
        return 0;
    struct socket_record *r = events.ringbuf_reserve(sizeof(struct socket_record));
    if (!r)
        count_lost(episode, LOST_RINGBUF_FULL);
    return r;
}

static __always_inline struct payload_record *reserve_payload(__u64 episode)
{
    if (!within_ring_share(episode))
        return 0;
    struct payload_record *r = events.ringbuf_reserve(sizeof(struct payload_record));
    if (!r)
        count_lost(episode, LOST_RINGBUF_FULL);
    return r;
}

static __always_inline struct burst_record *reserve_burst(__u64 episode)
{
    if (!within_ring_share(episode))
        return 0;
    struct burst_record *r = events.ringbuf_reserve(sizeof(struct burst_record));
    if (!r)
        count_lost(episode, LOST_RINGBUF_FULL);
    return r;
}

static __always_inline struct icmp_record *reserve_icmp(__u64 episode)
{
    if (!within_ring_share(episode))
        return 0;
    struct icmp_record *r = events.ringbuf_reserve(sizeof(struct icmp_record));
    if (!r)
        count_lost(episode, LOST_RINGBUF_FULL);
    return r;
}

static __always_inline struct process_record *reserve_process(__u64 episode)
{
    if (!within_ring_share(episode))
        return 0;
    struct process_record *r = events.ringbuf_reserve(sizeof(struct process_record));
    if (!r)
        count_lost(episode, LOST_RINGBUF_FULL);
    return r;
}

/* Never wake the reader per record: userspace drains the buffer on a 50 ms timer
 * (tracer/pipeline.py POLL_MS), and a wakeup per record would cost the sandbox's
 * CPU. 32 MiB hold over 200k records, seconds of the worst flood measured.
 * Records userspace must act on while a process lives (an exec whose argv it reads
 * from /proc) wake it at once: they are few, and the timer would often be too late. */
#define SUBMIT_FLAGS BPF_RB_NO_WAKEUP
#define SUBMIT_NOW BPF_RB_FORCE_WAKEUP

static __always_inline int is_episode(__u64 cgid)
{
    return cgid && episodes.lookup(&cgid) != NULL;
}

/* The episode cgroup of the current task: its own cgroup or an ancestor. */
static __always_inline __u64 current_episode(void)
{
    __u64 id = bpf_get_current_cgroup_id();
    if (is_episode(id))
        return id;
    __u32 k0 = 0, k1 = 1;
    __u32 *lo = episode_levels.lookup(&k0), *hi = episode_levels.lookup(&k1);
    if (!lo || !hi)
        return 0;
    for (__u32 level = 0; level < MAX_CGROUP_LEVEL; level++) {
        if (level < *lo)
            continue;
        if (level > *hi)
            break;
        __u64 anc = bpf_get_current_ancestor_cgroup_id(level);
        if (!anc)
            break;
        if (is_episode(anc))
            return anc;
    }
    return 0;
}

/* Is the tracer gone (fail-closed) at now (CLOCK_MONOTONIC, precise or coarse: a coarse clock only makes
 * a timeout of seconds a tick later)? When the tracer is alive and refreshed within every timeout in force,
 * one array lookup: the episode's own mark is read only once the tracer is late or has exited. */
static __always_inline int tracer_gone_at(__u64 episode, __u64 now)
{
    int zero = 0;
    struct liveness *l = liveness.lookup(&zero);
    if (!l)
        return 0;
    __u64 timeout = l->timeout_ns, episode_timeout = l->episode_timeout_ns;
    if (!timeout && !episode_timeout)
        return 0;
    /* Signed: a refresh written after `now` was read (or a coarse `now`) is fresh, not 2^64 ns old. */
    __s64 age = now - l->refreshed_ns;
    int exited = l->tracer_exited;
    if (!exited && (!timeout || age <= (__s64)timeout) && (!episode_timeout || age <= (__s64)episode_timeout))
        return 0;
    if (!timeout) {
        __u32 *flags = episodes.lookup(&episode);
        if (!flags || !(*flags & EPISODE_FAIL_CLOSED))
            return 0;
        timeout = episode_timeout;
    }
    return exited || age > (__s64)timeout;
}

static __always_inline int tracer_gone(__u64 episode)
{
    return tracer_gone_at(episode, bpf_ktime_get_ns());
}

/* Is the tracer gone? Then count a refusal (a connect, a send, a raw socket, a packet) for the episode. */
static __always_inline int refuse_without_tracer(__u64 episode)
{
    if (!tracer_gone(episode))
        return 0;
    refused.increment(episode);
    return 1;
}

/* The tracer's process is gone: no window until the liveness timeout, where a sandbox that killed it
 * could connect before the watchdog kills the episode. One lookup per process exit on the host. */
static __always_inline void note_tracer_exit(void)
{
    int zero = 0;
    struct liveness *l = liveness.lookup(&zero);
    if (l && l->tracer_tgid && l->tracer_tgid == bpf_get_current_pid_tgid() >> 32)
        l->tracer_exited = 1;
}

static __always_inline void fill_current_owner(struct owner *o, __u64 episode)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    o->cgroup_id = bpf_get_current_cgroup_id();
    o->episode_cgroup_id = episode;
    o->tgid = pid_tgid >> 32;
    o->pid = (__u32)pid_tgid;
    bpf_get_current_comm(o->comm, sizeof(o->comm));
}

/* The socket's storage, owned by the current task: call in task context only. */
static __always_inline struct sock_state *owned_state(struct bpf_sock *sk, __u64 episode)
{
    struct sock_state *st = sockets.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st) {
        count_lost(episode, LOST_NO_STORAGE);
        return 0;
    }
    if (st->owner.episode_cgroup_id != episode)
        st->packet_policy = 0;      /* a socket passed to another episode: its packets read that one's policy */
    fill_current_owner(&st->owner, episode);
    st->start_ns = bpf_ktime_get_ns();
    return st;
}

static __always_inline void fill_header(struct record_header *h, __u32 type, __u32 size,
                                        __u64 cookie, const struct owner *o)
{
    h->type = type;
    h->size = size;
    h->ts_ns = bpf_ktime_get_ns();
    h->cookie = cookie;
    __builtin_memcpy(&h->owner, o, sizeof(*o));
}

/* A net_record of a socket's flow as its storage has it: the caller may adjust it, then submits.
 * None for a routine flow that the budget refused. */
static __always_inline struct net_record *flow_record(__u32 type, __u64 cookie, struct sock_state *st)
{
    if (!flow_admitted(st->owner.episode_cgroup_id, st->routine))
        return 0;
    struct net_record *r = reserve_net(st->owner.episode_cgroup_id);
    if (!r)
        return 0;
    fill_header(&r->h, type, sizeof(*r), cookie, &st->owner);
    r->ep = st->ep;
    r->c = st->c;
    r->a = st->a;
    r->start_ns = st->start_ns;
    r->flags = st->flags;
    r->ret = 0;
    return r;
}

#endif
