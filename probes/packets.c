/* Per-packet byte and packet counts, kept in socket storage so that userspace
 * sees one record per flow, never one per packet. */
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

static __always_inline void report_update(struct __sk_buff *skb, struct sock_state *st, __u64 now)
{
    __u32 key = 0;
    __u64 *interval = settings.lookup(&key);
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
    __u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    if (egress) {
        __sync_fetch_and_add(&st->c.bytes_out, bytes);
        __sync_fetch_and_add(&st->c.packets_out, segs);
    } else {
        __sync_fetch_and_add(&st->c.bytes_in, bytes);
        __sync_fetch_and_add(&st->c.packets_in, segs);
    }
    if (!bytes || !headers)
        return 1;                   /* handshakes and bare ACKs: counted, nothing more */
    __u64 now = bpf_ktime_get_ns();
    note_activity(&st->a, now, egress);
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
