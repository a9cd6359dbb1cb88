/* Per-packet byte and packet counts, kept in socket storage so that userspace
 * sees one record per flow, never one per packet; ICMP echo payloads summed per
 * destination, reported only when they carry data. */
#include "common.h"

/* The length of the IP and TCP/UDP headers, read directly (cgroup_skb sees the
 * packet from the IP header on); 0 when they cannot be read. */
static __always_inline __u32 header_len(struct __sk_buff *skb, __u8 protocol)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    __u32 ip_len = 40;
    if (skb->family == AF_INET) {
        __u8 *vihl = data;
        if ((void *)(vihl + 1) > end)
            return 0;
        ip_len = (*vihl & 0x0f) * 4;
    }
    __u32 l4_len = 0;
    if (protocol == IPPROTO_TCP) {
        __u8 *doff = data + (ip_len & 0x3f) + 12;
        if ((void *)(doff + 1) > end)
            return 0;
        l4_len = (*doff >> 4) * 4;
    } else if (protocol == IPPROTO_UDP) {
        l4_len = 8;
    }
    return ip_len + l4_len;
}

/* The UDP destination port of an egress packet, from the packet itself: an
 * unconnected socket has none recorded. */
static __always_inline __u16 udp_dport(struct __sk_buff *skb, __u32 headers)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    __u8 *port = data + ((headers - 8) & 0x7f) + 2;     /* UDP header: sport, dport */
    if ((void *)(port + 2) > end)
        return 0;
    return ((__u16)port[0] << 8) | port[1];
}

/* The UDP source port of a packet (an answer's: 53 for DNS). */
static __always_inline __u16 udp_sport(struct __sk_buff *skb, __u32 headers)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    __u8 *port = data + ((headers - 8) & 0x7f);
    if ((void *)(port + 2) > end)
        return 0;
    return ((__u16)port[0] << 8) | port[1];
}

/* Silences of >= 1 s mark the start of an exchange: who breaks them, and how
 * long they last, shows keep-alive cadence and role inversion. */
static __always_inline void note_activity(struct activity *a, __u64 now, int egress)
{
    __u64 last = a->last_ns;
    a->last_ns = now;
    if (!last || now - last < 1000000000ULL)
        return;
    __u64 gap_s = (now - last) / 1000000000ULL;
    __u32 bucket = 0;
    for (int i = 0; i < GAP_BUCKETS - 1; i++)
        if (gap_s >> (i + 1))
            bucket = i + 1;
    if (bucket < GAP_BUCKETS)
        a->gaps[bucket]++;
    if (egress)
        a->exchanges_out++;
    else
        a->exchanges_in++;
}

/* Bursts: per episode, at most BURSTS_PER_SECOND (beyond, counted as lost), and
 * bursts of local flows (loopback, or to the sandbox's own address) only within
 * LOCAL_BURST_WINDOW_NS of a burst on a flow to the outside: a relay's local leg
 * moves when its outside leg does, and a busy local workload alone costs nothing. */
#define BURSTS_PER_SECOND 1000
#define LOCAL_BURST_WINDOW_NS 10000000000ULL
struct burst_window {
    __u64 start_ns;           /* this second's budget began */
    __u64 outside_ns;         /* the last burst on a flow to the outside */
    __u32 count;              /* bursts sent this second */
    __u32 pad;
};
BPF_F_TABLE(PINNED("lru_hash", burst_windows), __u64, struct burst_window, burst_windows, 4096, 0);

static __always_inline int is_local_peer(const struct endpoints *ep)
{
    __u32 d[4], s[4];
    __builtin_memcpy(d, ep->daddr, 16);
    __builtin_memcpy(s, ep->saddr, 16);
    if (ep->family == AF_INET)
        return ep->daddr[0] == 127 || (d[0] && d[0] == s[0]);
    const __u8 *b = ep->daddr;
    if (d[0] == 0 && d[1] == 0 && d[2] == 0 && !b[12] && !b[13] && !b[14] && b[15] == 1)
        return 1;                                           /* ::1 */
    if (d[0] == 0 && d[1] == 0 && !b[8] && !b[9] && b[10] == 0xff && b[11] == 0xff && b[12] == 127)
        return 1;                                           /* ::ffff:127.x */
    return (d[0] | d[1] | d[2] | d[3]) && d[0] == s[0] && d[1] == s[1] && d[2] == s[2] && d[3] == s[3];
}

static __always_inline void note_burst(struct __sk_buff *skb, struct sock_state *st, __u8 protocol, __u32 bytes,
                                       int egress, __u64 now)
{
    __u64 *last = egress ? &st->burst_out_ns : &st->burst_in_ns;
    __u64 prev = *last;
    *last = now;
    /* A turn: the flow's previous data packet went the other way (the order of the packets, not of
     * their times: the per-packet clock is coarse, a ping and its pong often share a tick). */
    int turn = st->data_last_out != egress;
    st->data_last_out = egress;
    /* The same burst: no silence, and no turn (the other side has not spoken since). A turn
     * counts on flows to the outside only: a loopback ping-pong would make every packet one. */
    int same = prev && now - prev < BURST_IDLE_NS;
    if (same && !turn)
        return;
    int local = is_local_peer(&st->ep);
    if (same && local)
        return;
    __u64 episode = st->owner.episode_cgroup_id;
    struct burst_window *w = burst_windows.lookup(&episode);
    if (!w) {
        if (local)
            return;           /* nothing outside has moved yet */
        struct burst_window fresh = {.start_ns = now, .outside_ns = now};
        burst_windows.update(&episode, &fresh);
        w = burst_windows.lookup(&episode);
        if (!w)
            return;
    }
    if (local && now - w->outside_ns > LOCAL_BURST_WINDOW_NS)
        return;
    if (!local)
        w->outside_ns = now;
    if (now - w->start_ns >= 1000000000ULL) {
        w->start_ns = now;
        w->count = 0;
    }
    if (w->count >= BURSTS_PER_SECOND) {
        count_lost(episode, LOST_BURST_BUDGET);
        return;
    }
    __sync_fetch_and_add(&w->count, 1);
    struct burst_record *r = reserve_burst(episode);
    if (!r)
        return;
    fill_header(&r->h, REC_BURST, sizeof(*r), bpf_get_socket_cookie(skb), &st->owner);
    r->idle_ns = prev ? now - prev : 0;
    r->bytes = bytes;
    r->egress = egress;
    r->protocol = protocol;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
}

static __always_inline void capture_payload(struct __sk_buff *skb, struct sock_state *st, __u8 protocol,
                                            __u32 headers, __u32 bytes, int egress, __u8 index)
{
    /* The first packets name the protocol (evidence); later ones (DNS queries) are budgeted,
     * like every packet of a routine flow. */
    __u64 episode = st->owner.episode_cgroup_id;
    if (!flow_admitted(episode, st->routine) ||
        (st->routine || index >= PAYLOAD_PACKETS) && !within_budget(episode))
        return;
    struct payload_record *r = reserve_payload(episode);
    if (!r)
        return;
    fill_header(&r->h, REC_PAYLOAD, sizeof(*r), bpf_get_socket_cookie(skb), &st->owner);
    r->ep = st->ep;
    r->ep.protocol = protocol;          /* unconnected sockets have no endpoints recorded */
    r->total = bytes;
    r->egress = egress;
    r->index = index;
    __u64 len = bytes < PAYLOAD_LEN ? bytes : PAYLOAD_LEN;
    /* Opaque to the compiler, so the bound checks below reach the verifier. */
    asm volatile("%[len] &= 0x1ff" : [len] "+r"(len));
    if (len < 1 || len > PAYLOAD_LEN)
        len = 0;
    else if (bpf_skb_load_bytes(skb, headers, r->data, len))
        len = 0;
    r->len = len;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
}

/* Echo requests per (episode, destination), whatever socket sent them: a new
 * socket per echo resets nothing. Bounded: the least recently used go first. */
struct icmp_key {
    __u64 episode;
    __u8 daddr[16];
    __u32 family;
    __u32 pad;
};
struct icmp_state {
    __u64 first_ns;
    __u64 data_bytes;
    __u64 digest;             /* of the previous echo's payload */
    __u32 echoes;
    __u32 data_echoes;
    __u32 largest;
    __u32 pad;
};
BPF_F_TABLE(PINNED("lru_hash", icmp_echoes), struct icmp_key, struct icmp_state, icmp_echoes, 4096, 0);

/* FNV-1a over the payload [start, end) in 8-byte words, at most ICMP_DIGEST_LEN
 * bytes, the last (partial) word read overlapping its predecessor. */
static __always_inline __u64 payload_digest(struct __sk_buff *skb, __u32 start, __u32 end)
{
    __u64 hash = 0xcbf29ce484222325ULL ^ (end - start);
    __u64 words[4];
    __u32 off = start;
    for (int i = 0; i < ICMP_DIGEST_LEN / 32; i++) {
        if (off + 32 > end || bpf_skb_load_bytes(skb, off, words, 32))
            break;
        for (int j = 0; j < 4; j++)
            hash = (hash ^ words[j]) * 0x100000001b3ULL;
        off += 32;
    }
    for (int i = 0; i < 3; i++) {
        if (off + 8 > end || bpf_skb_load_bytes(skb, off, words, 8))
            break;
        hash = (hash ^ words[0]) * 0x100000001b3ULL;
        off += 8;
    }
    if (off < end && end - start >= 8 && !bpf_skb_load_bytes(skb, end - 8, words, 8))
        hash = (hash ^ words[0]) * 0x100000001b3ULL;
    else if (off < end) {
        __u8 b = 0;
        for (int i = 0; i < 8; i++) {
            if (off + i >= end || bpf_skb_load_bytes(skb, off + i, &b, 1))
                break;
            hash = (hash ^ b) * 0x100000001b3ULL;
        }
    }
    return hash;
}

/* An ICMP echo request leaving a socket of the episode (ping socket or raw):
 * counted per destination; a record only when it carried data, at the first
 * ICMP_REPORT_ALL such echoes and then at powers of two. */
static __always_inline void note_icmp_echo(struct __sk_buff *skb, struct sock_state *st, __u8 socktype)
{
    struct icmp_key key = {};
    __u8 saddr[16] = {};
    __u32 ip_len = 40;
    __u8 proto = 0, type = 0, echo_request;
    if (skb->family == AF_INET) {
        __u8 vihl = 0;
        if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 9, &proto, 1) ||
            bpf_skb_load_bytes(skb, 12, saddr, 4) || bpf_skb_load_bytes(skb, 16, key.daddr, 4))
            return;
        ip_len = (vihl & 0x0f) * 4;
        if (proto != IPPROTO_ICMP)
            return;
        echo_request = 8;
    } else if (skb->family == AF_INET6) {
        if (bpf_skb_load_bytes(skb, 6, &proto, 1) || bpf_skb_load_bytes(skb, 8, saddr, 16) ||
            bpf_skb_load_bytes(skb, 24, key.daddr, 16))
            return;
        /* hop-by-hop, routing and destination options (IPV6_HOPOPTS... on a raw socket) come first */
        for (int i = 0; i < 4 && (proto == 0 || proto == 43 || proto == 60); i++) {
            __u8 ext[2];
            if (bpf_skb_load_bytes(skb, ip_len & 0x3ff, ext, 2))
                return;
            proto = ext[0];
            ip_len += (ext[1] + 1) * 8;
        }
        if (proto != IPPROTO_ICMPV6)
            return;
        echo_request = 128;
    } else {
        return;
    }
    if (bpf_skb_load_bytes(skb, ip_len, &type, 1) || type != echo_request)
        return;
    __u32 start = ip_len + 8;                   /* after type, code, checksum, id, sequence */
    if (skb->len < start)
        return;
    __u32 payload = skb->len - start;
    key.episode = st->owner.episode_cgroup_id;
    key.family = skb->family;
    __u64 now = bpf_ktime_get_ns();
    struct icmp_state *s = icmp_echoes.lookup(&key);
    if (!s) {
        struct icmp_state fresh = {};
        fresh.first_ns = now;
        icmp_echoes.update(&key, &fresh);
        s = icmp_echoes.lookup(&key);
        if (!s)
            return;
    }
    __u32 setting = SET_ICMP_LARGE;
    __u64 *large = settings.lookup(&setting);
    /* ping's payload starts with its send time (a struct timeval: seconds below
     * 2^40 and microseconds below 2^20, little-endian), then a fixed fill
     * pattern. The digest leaves out such a time, and only one of that shape. */
    __u32 from = start;
    __u64 stamp[2] = {};
    if (payload >= ICMP_STAMP_LEN && !bpf_skb_load_bytes(skb, start, stamp, sizeof(stamp)) &&
        !(stamp[0] >> 40) && !(stamp[1] >> 20))
        from = start + ICMP_STAMP_LEN;
    __u64 digest = payload_digest(skb, from, skb->len);
    int first = s->echoes == 0;   /* racy across CPUs, as the digest: a count, not a proof */
    __sync_fetch_and_add(&s->echoes, 1);
    __u64 previous = s->digest;
    s->digest = digest;
    if (payload > s->largest)
        s->largest = payload;
    int data = payload > ICMP_STAMP_LEN + ICMP_DIGEST_LEN ||
               (first ? large && *large && payload >= *large : digest != previous);
    if (!data)
        return;
    __sync_fetch_and_add(&s->data_echoes, 1);   /* bcc's default target has no fetching XADD */
    __sync_fetch_and_add(&s->data_bytes, payload);
    __u32 n = s->data_echoes;
    if (n > ICMP_REPORT_ALL && (n & (n - 1)))
        return;
    struct icmp_record *r = reserve_icmp(key.episode);
    if (!r)
        return;
    fill_header(&r->h, REC_ICMP_ECHO, sizeof(*r), bpf_get_socket_cookie(skb), &st->owner);
    __builtin_memset(&r->ep, 0, sizeof(r->ep));
    __builtin_memcpy(r->ep.saddr, saddr, 16);
    __builtin_memcpy(r->ep.daddr, key.daddr, 16);
    r->ep.family = skb->family;
    r->ep.protocol = proto;
    r->ep.socktype = socktype;
    r->first_ns = s->first_ns;
    r->data_bytes = s->data_bytes;
    r->echoes = s->echoes;
    r->data_echoes = n;
    r->largest = s->largest;
    r->payload = payload;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
}

static __always_inline void report_update(struct __sk_buff *skb, struct sock_state *st, __u64 now)
{
    /* Within the interval this flow last read: the setting is not read again (a shorter one written
     * since applies from this flow's next update on). */
    if (st->last_update_ns && now - st->last_update_ns < st->update_interval_ns)
        return;
    __u32 key = SET_UPDATE_INTERVAL;
    __u64 *interval = settings.lookup(&key);
    if (interval)
        st->update_interval_ns = *interval;
    if (!interval || !*interval || !st->last_update_ns) {
        if (!st->last_update_ns)
            st->last_update_ns = now;
        return;
    }
    if (now - st->last_update_ns < *interval)
        return;
    st->last_update_ns = now;
    /* Counters only: budgeted, for every flow (flow_record refuses a refused flow's). */
    if (st->routine != ROUTINE_REFUSED && !within_budget(st->owner.episode_cgroup_id))
        return;
    struct net_record *r = flow_record(REC_FLOW_UPDATE, bpf_get_socket_cookie(skb), st);
    if (r)
        events.ringbuf_submit(r, SUBMIT_FLAGS);
}

/* Episode of a socket made before its cgroup was registered: from the socket's cgroup. */
static __always_inline __u64 socket_episode(struct bpf_sock *sk)
{
    __u64 id = bpf_sk_cgroup_id(sk);
    if (is_episode(id))
        return id;
    for (int level = 0; level < MAX_CGROUP_LEVEL; level++) {
        __u64 anc = bpf_sk_ancestor_cgroup_id(sk, level);
        if (!anc)
            break;
        if (is_episode(anc))
            return anc;
    }
    return 0;
}

#define BPF_TCP_LISTEN_STATE 10      /* enum BPF_TCP_LISTEN */

/* Is an IPv4 or IPv6 packet's source a loopback address? */
static __always_inline int from_loopback(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    if (skb->family == AF_INET) {
        __u8 *src = data + 12;
        if ((void *)(src + 4) > end)
            return 0;
        return src[0] == 127;
    }
    __u32 *src = data + 8;
    if ((void *)(src + 4) > end)
        return 0;
    return src[0] == 0 && src[1] == 0 && ((src[2] == 0 && src[3] == bpf_htonl(1)) ||
                                          (src[2] == bpf_htonl(0xffff) && (bpf_ntohl(src[3]) >> 24) == 127));
}

/* Packets the episode's policy drops: all of a contained episode's (its open flows stall: the kernel
 * here has no bpf_sock_destroy to reset them), those of the flows on_alert = "cut" cut, and connections to
 * its TCP listeners from where listen does not allow (their SYN is dropped, so none is ever accepted). */
#define DROP_NONE 0
#define DROP_CONTAINED 1
#define DROP_CUT 2
#define DROP_LISTEN 3

/* What a packet needs of its episode's policy, in one word of the socket's storage with the generation
 * of the policies map it was read at (settings[SET_POLICY_GENERATION], bumped by userspace after every
 * write to policies): an array lookup per packet where the policy cost a hash lookup. One word, so that
 * a CPU that read an older generation can only leave an entry the next packet finds stale. */
#define PP_LISTEN 0x03            /* LISTEN_* */
#define PP_CONTAINED 0x04
#define PP_CUT 0x08
#define PP_NAMES 0x10
#define PP_PRESENT 0x20           /* the episode has a policy */
#define PP_READ 0x40              /* the word holds a policy read at generation word >> 8 */
#define PP_GENERATION_BITS 56
static __always_inline __u8 packet_policy(struct sock_state *st)
{
    __u32 key = SET_POLICY_GENERATION;
    __u64 *written = settings.lookup(&key);
    __u64 generation = written ? *written & ((1ULL << PP_GENERATION_BITS) - 1) : 0;
    __u64 cached = *(volatile __u64 *)&st->packet_policy;
    if (written && (cached & PP_READ) && cached >> 8 == generation)
        return cached;
    /* The generation is read before the policy: a write after it leaves a stale entry, never a wrong one. */
    struct episode_policy *p = episode_policy(st->owner.episode_cgroup_id);
    __u8 bits = PP_READ;
    if (p)
        bits |= PP_PRESENT | (p->listen & PP_LISTEN) | (p->contained ? PP_CONTAINED : 0) |
                (p->cut ? PP_CUT : 0) | (p->names ? PP_NAMES : 0);
    *(volatile __u64 *)&st->packet_policy = generation << 8 | bits;
    return bits;
}

static __always_inline int policy_drops(struct __sk_buff *skb, struct bpf_sock *sk, __u8 policy, int egress)
{
    if (policy & PP_CONTAINED)
        return DROP_CONTAINED;
    if (policy & PP_CUT) {
        __u64 cookie = bpf_get_socket_cookie(skb);
        if (cut_flows.lookup(&cookie))
            return DROP_CUT;
    }
    __u8 listen = policy & PP_LISTEN;
    if (egress || listen == LISTEN_ANY || sk->state != BPF_TCP_LISTEN_STATE)
        return DROP_NONE;
    return listen == LISTEN_NONE || !from_loopback(skb) ? DROP_LISTEN : DROP_NONE;
}

/* A listener's refused connection, once per (episode, source address, listening port): an ACCEPTED record
 * with FLOW_DENIED, its peer from the SYN itself (the listener knows none). Evidence: never budgeted. */
static __always_inline void report_listen_refusal(struct __sk_buff *skb, struct sock_state *st)
{
    struct destination seen = {.episode = st->owner.episode_cgroup_id, .family = skb->family,
                               .protocol = IPPROTO_TCP, .inbound = 1};
    __u32 ip_len = 40;
    __u8 vihl = 0;
    if (skb->family == AF_INET) {
        if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 12, seen.addr, 4))
            return;
        ip_len = (vihl & 0x0f) * 4;
    } else if (bpf_skb_load_bytes(skb, 8, seen.addr, 16)) {
        return;
    }
    __u8 ports[4];
    if (bpf_skb_load_bytes(skb, ip_len & 0x3f, ports, 4))
        return;
    seen.port = ((__u16)ports[2] << 8) | ports[3];
    if (refusals_seen.lookup(&seen))
        return;
    __u8 one = 1;
    refusals_seen.update(&seen, &one);
    struct net_record *r = reserve_net(seen.episode);
    if (!r)
        return;
    fill_header(&r->h, REC_ACCEPTED, sizeof(*r), bpf_get_socket_cookie(skb), &st->owner);
    __builtin_memset(&r->ep, 0, sizeof(r->ep));
    __builtin_memset(&r->c, 0, sizeof(r->c));
    __builtin_memset(&r->a, 0, sizeof(r->a));
    __builtin_memcpy(r->ep.daddr, seen.addr, 16);
    if (skb->family == AF_INET)
        bpf_skb_load_bytes(skb, 16, r->ep.saddr, 4);          /* the address the SYN was sent to */
    else
        bpf_skb_load_bytes(skb, 24, r->ep.saddr, 16);
    r->ep.sport = seen.port;
    r->ep.dport = ((__u16)ports[0] << 8) | ports[1];
    r->ep.family = skb->family;
    r->ep.protocol = IPPROTO_TCP;
    r->ep.socktype = SOCK_STREAM;
    r->start_ns = bpf_ktime_get_ns();
    r->flags = FLOW_ACCEPTED | FLOW_DENIED;
    r->ret = POLICY_LISTEN;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
}

/* Host-name entries (tracer/policy.py): a DNS answer to one of the episode's own sockets, for a name its
 * policy allows, allows the answered addresses for their TTL. This runs in cgroup_skb ingress, before the
 * datagram reaches the socket: the addresses are allowed before the resolver can read the answer, so a
 * connect right after it passes. Answers over UDP from port 53, not from this host (a local "resolver" the
 * episode runs itself would answer what it likes). */
#define DNS_MAX 512                  /* bytes of an answer read; a power of two (index masks) */
#define DNS_LABELS 8                 /* a name's labels tried as suffixes (the first 8) */
#define DNS_ANSWERS 8                /* answer records read */
#define DNS_HASH_P 0x100000001b3ULL  /* hash(name) = sum byte[i] * P^i (mod 2^64); P odd: invertible */
#define DNS_HASH_PINV 0xce965057aff6957bULL
#define DNS_MAX_TTL 86400
#define LOOPBACK_IFINDEX 1
struct dns_buf {
    __u8 b[DNS_MAX];
    __u64 prefix[DNS_LABELS];        /* the hash of the bytes before each label, and P^-offset there */
    __u64 inverse[DNS_LABELS];
    struct policy_rules rules;       /* the new rules of an answered address */
    __u32 len, at, next, end, labels; /* the parser's cursors (KEPT) */
};
BPF_F_TABLE("percpu_array", int, struct dns_buf, dns_scratch, 1, 0);

static __always_inline void allow_answer(struct dns_buf *d, __u64 episode, __u16 family, __u32 at,
                                         struct policy_rule *rule, __u32 ttl)
{
    struct policy_key6 k6 = {.prefixlen = 64 + 128, .episode_hi = episode >> 32, .episode_lo = (__u32)episode};
    struct policy_key4 k4 = {.prefixlen = 64 + 32, .episode_hi = episode >> 32, .episode_lo = (__u32)episode};
    for (int i = 0; i < 16; i++) {
        if (family == AF_INET && i >= 4)
            break;
        __u8 byte = d->b[(at + i) & (DNS_MAX - 1)];
        if (family == AF_INET)
            k4.addr[i & 3] = byte;
        else
            k6.addr[i] = byte;
    }
    /* The longest prefix that covers the address now: its rules (deny first) stay, the name's is added. */
    struct policy_rules *now = family == AF_INET ? policy4.lookup(&k4) : policy6.lookup(&k6);
    if (now)
        __builtin_memcpy(&d->rules, now, sizeof(d->rules));
    else
        d->rules.n = 0;
    __u32 expires = bpf_ktime_get_ns() / 1000000000ULL + (ttl > DNS_MAX_TTL ? DNS_MAX_TTL : ttl) + 1;
    __u32 n = d->rules.n;
    if (n > POLICY_RULES)
        return;
    __u32 slot = n;
    if (n) {
        /* The same name answered again (its rule is the last one added): a new expiry, not a new rule. */
        struct policy_rule *last = &d->rules.r[(n - 1) & (POLICY_RULES - 1)];
        if (last->entry == rule->entry && last->expires_s)
            slot = n - 1;
    }
    if (slot >= POLICY_RULES)
        return;                      /* full: the address stays as the policy had it */
    if (slot == n)
        d->rules.n = n + 1;
    struct policy_rule *r = &d->rules.r[slot & (POLICY_RULES - 1)];
    *r = *rule;
    r->expires_s = expires;
    if (family == AF_INET)
        policy4.update(&k4, &d->rules);
    else
        policy6.update(&k6, &d->rules);
}

/* bcc rewrites map calls only outside macros. */
static __always_inline struct policy_rule *dns_names_lookup(struct dns_name_key *key)
{
    return dns_names.lookup(key);
}

static __always_inline __u16 be16(struct dns_buf *d, __u32 at)
{
    return ((__u16)d->b[at & (DNS_MAX - 1)] << 8) | d->b[(at + 1) & (DNS_MAX - 1)];
}

/* The parser's cursors live in the scratch map and are read back through volatile loads: the verifier
 * then sees unknown (bounded-by-check) values at each loop head, and the paths through the loops merge
 * instead of multiplying. */
#define KEPT(field) (*(volatile __u32 *)&d->field)

static __always_inline void learn_dns_answer(struct __sk_buff *skb, __u64 episode, __u32 headers)
{
    /* Not from this host: a datagram the episode sends itself (to its own address, from port 53) comes in
     * through the loopback device (ifindex 1 in every namespace), whatever its source address. */
    if (from_loopback(skb) || skb->ingress_ifindex == LOOPBACK_IFINDEX || udp_sport(skb, headers) != 53)
        return;
    int zero = 0;
    struct dns_buf *d = dns_scratch.lookup(&zero);
    if (!d)
        return;
    __u32 len = skb->len > headers ? skb->len - headers : 0;
    if (len > DNS_MAX)
        len = DNS_MAX;
    if (len < 17 || bpf_skb_load_bytes(skb, headers, d->b, len))
        return;
    if (!(d->b[2] & 0x80) || be16(d, 4) != 1)
        return;                      /* not an answer, or not to one question */
    KEPT(len) = len;
    /* The question's name: hash it, remembering the hash before each label (for its suffixes). */
    __u64 hash = 0, power = 1, inverse = 1;
    KEPT(labels) = 0;
    KEPT(next) = 12;
    KEPT(end) = 0;
    for (__u32 at = 12; at < 12 + 255; at++) {
        if (at >= KEPT(len))
            return;
        __u8 c = d->b[at & (DNS_MAX - 1)];
        if (at == KEPT(next)) {
            if (c == 0) {
                KEPT(end) = at;
                break;
            }
            if (c & 0xc0)
                return;
            __u32 labels = KEPT(labels);
            if (labels < DNS_LABELS) {
                d->prefix[labels & (DNS_LABELS - 1)] = hash;
                d->inverse[labels & (DNS_LABELS - 1)] = inverse;
                KEPT(labels) = labels + 1;
            }
            KEPT(next) = at + 1 + c;
        } else if (c >= 'A' && c <= 'Z') {
            c += 'a' - 'A';
        }
        hash += c * power;
        power *= DNS_HASH_P;
        inverse *= DNS_HASH_PINV;
    }
    __u32 end = KEPT(end), labels = KEPT(labels);
    if (!end || end > DNS_MAX || labels > DNS_LABELS)
        return;
    /* The name itself, then its suffixes from each later label (constant indices: no loop to verify). */
    struct policy_rule *rule = 0;
#define TRY_SUFFIX(i)                                                                              \
    if (!rule && labels > i) {                                                                     \
        struct dns_name_key key = {.episode = episode, .wildcard = i > 0,                          \
                                   .hash = (hash - d->prefix[i]) * d->inverse[i]};                 \
        rule = dns_names_lookup(&key);                                                             \
    }
    TRY_SUFFIX(0) TRY_SUFFIX(1) TRY_SUFFIX(2) TRY_SUFFIX(3)
    TRY_SUFFIX(4) TRY_SUFFIX(5) TRY_SUFFIX(6) TRY_SUFFIX(7)
    if (!rule)
        return;
    struct policy_rule allowed = *rule;
    __u16 answers = be16(d, 6);
    KEPT(at) = end + 5;              /* past the name's 0 and QTYPE, QCLASS */
    for (int a = 0; a < DNS_ANSWERS; a++) {
        if (a >= answers)
            break;
        /* The record's name: a pointer, or labels (to a pointer or the root). */
        for (int j = 0; j < 64; j++) {
            __u32 at = KEPT(at);
            if (at >= DNS_MAX)
                return;
            __u8 c = d->b[at & (DNS_MAX - 1)];
            if ((c & 0xc0) == 0xc0) {
                KEPT(at) = at + 2;
                break;
            }
            KEPT(at) = at + 1 + c;
            if (c == 0)
                break;
        }
        __u32 at = KEPT(at);
        len = KEPT(len);
        if (at > DNS_MAX || len > DNS_MAX || at + 10 > len)
            return;
        __u16 type = be16(d, at);
        __u32 ttl = ((__u32)be16(d, at + 4) << 16) | be16(d, at + 6);
        __u16 rdlength = be16(d, at + 8);
        at += 10;
        if (at + rdlength > len)
            return;
        if (type == 1 && rdlength == 4)
            allow_answer(d, episode, AF_INET, at, &allowed, ttl);
        else if (type == 28 && rdlength == 16)
            allow_answer(d, episode, AF_INET6, at, &allowed, ttl);
        KEPT(at) = at + rdlength;
    }
}

static __always_inline int count_packet(struct __sk_buff *skb, int egress)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 1;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return 1;
    struct sock_state *st = sockets.sk_storage_get(sk, 0, 0);
    if (!st) {
        __u64 episode = socket_episode(sk);
        if (!episode)
            return 1;
        st = sockets.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (!st) {
            count_lost(episode, LOST_NO_STORAGE);
            return 1;
        }
        st->owner.episode_cgroup_id = episode;
        st->owner.cgroup_id = bpf_sk_cgroup_id(sk);
        st->start_ns = bpf_ktime_get_ns();
    }
    __u8 policy = packet_policy(st);
    int drop = policy & PP_PRESENT ? policy_drops(skb, sk, policy, egress) : DROP_NONE;
    if (drop) {
        denied.increment(st->owner.episode_cgroup_id);
        if (drop == DROP_LISTEN)
            report_listen_refusal(skb, st);
        return 0;
    }
    /* Fail-closed: with no tracer alive, a flow opened before (an ssh -R tunnel) or a ping socket
     * must not keep talking to other hosts. Loopback is the episode's own business. */
    /* The clock, read once a packet needs it. Coarse (CLOCK_MONOTONIC at the last tick, a few ms behind):
     * a precise read costs a packet more than anything else here, and every time a packet keeps (silences
     * of >= 1 s, bursts after 200 ms, the update interval, liveness timeouts of seconds) is far coarser.
     * Records keep their precise timestamps (fill_header). */
    __u64 now = 0;
    if (!from_loopback(skb)) {
        now = bpf_ktime_get_coarse_ns();
        if (tracer_gone_at(st->owner.episode_cgroup_id, now)) {
            refused.increment(st->owner.episode_cgroup_id);
            return 0;
        }
    }
    if (egress && !st->ep.sport) {
        /* UDP and raw sockets: learn the local end, which no hook reports. */
        st->ep.sport = sk->src_port;
        if (sk->family == AF_INET) {
            __u32 a = sk->src_ip4;
            __builtin_memcpy(st->ep.saddr, &a, 4);
        } else {
            __u32 a[4] = {sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3]};
            __builtin_memcpy(st->ep.saddr, a, 16);
        }
    }
    __u8 protocol = sk->protocol;
    __u32 headers = header_len(skb, protocol);
    __u32 bytes = skb->len > headers ? skb->len - headers : 0;
    if ((policy & PP_NAMES) && !egress && protocol == IPPROTO_UDP && headers)
        learn_dns_answer(skb, st->owner.episode_cgroup_id, headers);
    __u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    if (egress) {
        __sync_fetch_and_add(&st->c.bytes_out, bytes);
        __sync_fetch_and_add(&st->c.packets_out, segs);
    } else {
        __sync_fetch_and_add(&st->c.bytes_in, bytes);
        __sync_fetch_and_add(&st->c.packets_in, segs);
    }
    if (egress && (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 || sk->type == SOCK_RAW))
        note_icmp_echo(skb, st, sk->type);
    if (!bytes || !headers)
        return 1;                   /* handshakes and bare ACKs: counted, nothing more */
    if (!now)
        now = bpf_ktime_get_coarse_ns();
    note_activity(&st->a, now, egress);
    note_burst(skb, st, protocol, bytes, egress, now);
    /* The first data packets each way name the protocol; every DNS query counts. */
    __u8 *captured = egress ? &st->captured_out : &st->captured_in;
    int dns_query = egress && protocol == IPPROTO_UDP && udp_dport(skb, headers) == 53;
    if (*captured < PAYLOAD_PACKETS || dns_query) {
        __u8 index = *captured;
        if (*captured < 255)
            (*captured)++;
        capture_payload(skb, st, protocol, headers, bytes, egress, index);
    }
    report_update(skb, st, now);
    return 1;
}

int on_egress(struct __sk_buff *skb) { return count_packet(skb, 1); }
int on_ingress(struct __sk_buff *skb) { return count_packet(skb, 0); }
