#include "CVioLwIP.h"
#include <lwip/opt.h>
#include <lwip/tcpip.h>
#include <lwip/tcp.h>
#include <lwip/netif.h>
#include <lwip/etharp.h>
#include <lwip/pbuf.h>
#include <netif/ethernet.h>
#include <pthread.h>
#include <semaphore.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>

#if defined(__x86_64__)
_Static_assert(offsetof(struct tcp_pcb, snd_buf) == 0xa8 && offsetof(struct tcp_pcb, flags) == 0x52
               && offsetof(struct tcp_pcb, keep_idle) == 0x108 && offsetof(struct tcp_pcb, mss) == 0x6e
               && sizeof(struct tcp_pcb) == 0x120,
               "lwIP's headers do not match the liblwip 2.1.3 these offsets were checked against");
#endif

struct vlw_listener {
    struct tcp_pcb *pcb;
    void *user;
    uint32_t keepalive_idle_ms;
    struct vlw_listener *next_closed;   // in g_closed_listeners once closed
};

struct vlw_conn {
    struct tcp_pcb *pcb;          // NULL once lwIP freed it (err callback) or we closed it
    vlw_listener *listener;
    struct pbuf *rx;              // received, unread
    size_t rx_len;
    uint32_t state;               // VLW_EV_PEER_CLOSED | VLW_EV_ERROR
    uint32_t events;              // collected since the last vlw_next_ready
    int err;
    int want_write;
    int in_ready;
    int released;                 // the application closed it; free when off the ready list
    int tx_shut;                  // vlw_conn_shutdown_write sent our FIN
    uint32_t remote_ip;
    uint16_t remote_port;
    void *user;
    struct vlw_conn *ready_next;
};

static struct netif g_netif;
static uint8_t g_mac[6];
static uint16_t g_mtu;
static vlw_tx_alloc_fn g_tx_alloc;
static void *g_tx_ctx;
static int g_started;
static vlw_stats g_stats;
static vlw_conn *g_ready_head, *g_ready_tail;
static atomic_int g_ready_count;
static atomic_int g_tx_pending;
static pthread_t g_tcpip_thread;   // lwIP's own thread, set once before vlw_start returns

void vlw_lock(void) { LOCK_TCPIP_CORE(); }
void vlw_unlock(void) { UNLOCK_TCPIP_CORE(); }

int vlw_work_pending(void) {
    return atomic_load_explicit(&g_ready_count, memory_order_relaxed) > 0
        || atomic_load_explicit(&g_tx_pending, memory_order_relaxed) > 0;
}

void vlw_set_tx_pending(int pending) { atomic_store_explicit(&g_tx_pending, pending, memory_order_relaxed); }

// A sleeping dataplane (adaptive idle) is woken through this eventfd when lwIP's own thread
// produces work for it: a frame from a timer, or a connection event. The dataplane announces
// the sleep and then looks for work; this thread records its work and then looks for a sleeper
// (all sequentially consistent), so a wake-up cannot be missed.
static atomic_int g_sleeping;
static int g_wake_fd = -1;

void vlw_set_wake_fd(int fd) { g_wake_fd = fd; }

int vlw_prepare_sleep(void) {
    atomic_store(&g_sleeping, 1);
    return atomic_load(&g_ready_count) == 0 && atomic_load(&g_tx_pending) == 0;
}

void vlw_end_sleep(void) { atomic_store_explicit(&g_sleeping, 0, memory_order_relaxed); }

static void wake_dataplane(void) {
    if (g_wake_fd >= 0 && atomic_load(&g_sleeping)) {
        uint64_t one = 1;
        ssize_t r = write(g_wake_fd, &one, sizeof one);
        (void)r;
    }
}

static void push_ready(vlw_conn *c, uint32_t ev) {
    c->events |= ev;
    if (c->in_ready) return;
    c->in_ready = 1;
    c->ready_next = NULL;
    if (g_ready_tail) g_ready_tail->ready_next = c; else g_ready_head = c;
    g_ready_tail = c;
    atomic_fetch_add(&g_ready_count, 1);
    if (pthread_equal(pthread_self(), g_tcpip_thread)) wake_dataplane();
}

// MARK: netif

static err_t vlw_linkoutput(struct netif *n, struct pbuf *p) {
    (void)n;
    if (p->tot_len > (uint32_t)g_mtu + 14 + 4) { g_stats.tx_too_big++; return ERR_IF; }
    void *dst = g_tx_alloc(g_tx_ctx, p->tot_len);
    if (!dst) { g_stats.tx_no_buffer++; return ERR_MEM; }
    pbuf_copy_partial(p, dst, p->tot_len, 0);
    g_stats.tx_frames++;
    g_stats.tx_bytes += p->tot_len;
    if (pthread_equal(pthread_self(), g_tcpip_thread)) {
        g_stats.tx_timer_frames++;
        atomic_store(&g_tx_pending, 1);
        wake_dataplane();
    } else {
        atomic_store_explicit(&g_tx_pending, 1, memory_order_relaxed);
    }
    return ERR_OK;
}

static err_t vlw_netif_init(struct netif *n) {
    n->name[0] = 'v';
    n->name[1] = 'n';
    n->output = etharp_output;
    n->linkoutput = vlw_linkoutput;
    n->mtu = g_mtu;
    n->hwaddr_len = 6;
    memcpy(n->hwaddr, g_mac, 6);
    n->flags = NETIF_FLAG_BROADCAST | NETIF_FLAG_ETHARP | NETIF_FLAG_ETHERNET;
    return ERR_OK;
}

// Runs on the tcpip thread once it has started (vlw_start waits for it).
static void tcpip_ready(void *arg) {
    g_tcpip_thread = pthread_self();
    sem_post((sem_t *)arg);
}

int vlw_start(const uint8_t mac[6], uint32_t ip, uint32_t mask, uint32_t gw, uint16_t mtu,
              vlw_tx_alloc_fn tx_alloc, void *ctx) {
    if (g_started) return -1;
    g_started = 1;
    memcpy(g_mac, mac, 6);
    g_mtu = mtu;
    g_tx_alloc = tx_alloc;
    g_tx_ctx = ctx;
    sem_t done;
    sem_init(&done, 0, 0);
    tcpip_init(tcpip_ready, &done);   // lwip_init + the tcpip thread
    while (sem_wait(&done) != 0) {}
    sem_destroy(&done);
    ip4_addr_t a, m, g;
    a.addr = ip; m.addr = mask; g.addr = gw;
    LOCK_TCPIP_CORE();
    netif_add(&g_netif, &a, &m, &g, NULL, vlw_netif_init, ethernet_input);
    netif_set_default(&g_netif);
    netif_set_up(&g_netif);
    netif_set_link_up(&g_netif);
    UNLOCK_TCPIP_CORE();
    return 0;
}

// MARK: segments larger than liblwip's TCP_MSS

// Debian's liblwip caps a connection's MSS at its compiled TCP_MSS (1460) when it reads the
// peer's SYN, whatever the interface's MTU. With an MTU over 1500 the glue reads the MSS option
// of each SYN itself (before lwIP sees the frame), keeps it by the peer's address and port, and
// on accept raises the pcb's mss to min(that MSS, MTU - 40). lwIP computes the initial
// congestion window from pcb->mss after the accept callback returns, and sizes every segment
// by it. Frames come from the device: every length is checked before it is read.
#define SYN_MSS_SLOTS 256
static struct { uint32_t ip; uint16_t port; uint16_t mss; } g_syn_mss[SYN_MSS_SLOTS];

static inline unsigned syn_slot(uint32_t ip, uint16_t port) {
    uint32_t h = (ip ^ ((uint32_t)port * 0x9e3779b1u)) * 0x85ebca6bu;
    return (h >> 24) & (SYN_MSS_SLOTS - 1);
}

uint16_t vlw_syn_mss(const void *frame, uint16_t len, uint32_t *src_ip, uint16_t *src_port) {
    const uint8_t *f = frame;
    if (len < 14 + 20 + 20 || f[12] != 0x08 || f[13] != 0x00) return 0;   // IPv4 only
    const uint8_t *ip = f + 14;
    unsigned ihl = (unsigned)(ip[0] & 0x0f) * 4;
    if ((ip[0] >> 4) != 4 || ihl < 20 || ip[9] != 6 || 14u + ihl + 20 > len) return 0;
    const uint8_t *tcp = ip + ihl;
    if ((tcp[13] & 0x12) != 0x02) return 0;   // SYN without ACK: a connection request
    unsigned doff = (unsigned)(tcp[12] >> 4) * 4;
    if (doff < 20 || 14u + ihl + doff > len) return 0;
    uint16_t mss = 0;
    for (unsigned i = 20; i < doff;) {
        uint8_t kind = tcp[i];
        if (kind == 0) break;                        // end of options
        if (kind == 1) { i++; continue; }            // no-op
        if (i + 1 >= doff) break;
        unsigned olen = tcp[i + 1];
        if (olen < 2 || i + olen > doff) break;      // malformed: stop reading
        if (kind == 2 && olen == 4) { mss = (uint16_t)(tcp[i + 2] << 8 | tcp[i + 3]); break; }
        i += olen;
    }
    memcpy(src_ip, ip + 12, 4);                      // network order, as lwIP keeps addresses
    *src_port = (uint16_t)(tcp[0] << 8 | tcp[1]);
    return mss;
}

static void note_syn_mss(const uint8_t *f, uint16_t len) {
    uint32_t src;
    uint16_t port;
    uint16_t mss = vlw_syn_mss(f, len, &src, &port);
    if (mss <= TCP_MSS) return;                      // none, or lwIP's own handling is right
    unsigned k = syn_slot(src, port);
    g_syn_mss[k].ip = src; g_syn_mss[k].port = port; g_syn_mss[k].mss = mss;
}

static void raise_mss(struct tcp_pcb *pcb, uint32_t ip, uint16_t port) {
    unsigned k = syn_slot(ip, port);
    if (g_syn_mss[k].mss == 0 || g_syn_mss[k].ip != ip || g_syn_mss[k].port != port) return;
    uint16_t mss = g_syn_mss[k].mss;
    g_syn_mss[k].mss = 0;
    if (mss > g_mtu - 40) mss = (uint16_t)(g_mtu - 40);
    if (mss <= pcb->mss) return;
    pcb->mss = mss;
    g_stats.large_mss_connections++;
    if (mss > g_stats.largest_mss) g_stats.largest_mss = mss;
}

// One contiguous PBUF_RAM per frame. Not PBUF_POOL: Debian's liblwip 2.1.3 sizes its pool
// pbufs (616-byte elements, for TCP_MSS 536) unlike what its shipped lwipopts.h implies
// (TCP_MSS 1460), and a full-size frame taken as a chain of pool pbufs corrupted the heap here
// (malloc(): invalid size, reproduced with any request body over one segment). The tcp_pcb and
// netif fields this file touches were checked against the library's own code (tcp_alloc's
// stores: snd_buf 0xa8, flags 0x52, keep_idle 0x108, size 0x120; tcp_parseopt's store of mss
// 0x6e), and the build stops if the headers disagree.
int vlw_input(const void *frame, uint16_t len) {
    if (g_mtu > 1500) note_syn_mss(frame, len);
    struct pbuf *p = pbuf_alloc(PBUF_RAW, len, PBUF_RAM);
    if (!p) { g_stats.rx_no_pbuf++; return -1; }
    pbuf_take(p, frame, len);
    if (g_netif.input(p, &g_netif) != ERR_OK) {
        pbuf_free(p);
        g_stats.rx_dropped++;
        return -1;
    }
    g_stats.rx_frames++;
    g_stats.rx_bytes += len;
    return 0;
}

// MARK: TCP callbacks (lock held, on either thread)

static err_t on_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err) {
    vlw_conn *c = arg;
    if (!c) {   // detached: behave like tcp_recv_null
        if (p) { tcp_recved(pcb, p->tot_len); pbuf_free(p); }
        return ERR_OK;
    }
    if (!p) {
        c->state |= VLW_EV_PEER_CLOSED;
        if (c->tx_shut) {
            // Both directions are closed: lwIP now finishes the connection by itself (TIME_WAIT
            // or CLOSING) and frees the pcb later without a callback, so let go of it here.
            tcp_arg(pcb, NULL); tcp_recv(pcb, NULL); tcp_sent(pcb, NULL); tcp_err(pcb, NULL);
            c->pcb = NULL;
        }
        push_ready(c, VLW_EV_PEER_CLOSED);
        return ERR_OK;
    }
    if (err != ERR_OK) { pbuf_free(p); return ERR_OK; }
    c->rx_len += p->tot_len;
    if (c->rx) pbuf_cat(c->rx, p); else c->rx = p;
    push_ready(c, VLW_EV_READABLE);
    return ERR_OK;
}

static err_t on_sent(void *arg, struct tcp_pcb *pcb, u16_t len) {
    (void)pcb; (void)len;
    vlw_conn *c = arg;
    if (c && c->want_write) { c->want_write = 0; push_ready(c, VLW_EV_WRITABLE); }
    return ERR_OK;
}

static void on_err(void *arg, err_t err) {
    vlw_conn *c = arg;
    if (!c) return;
    c->pcb = NULL;   // lwIP has freed it
    c->err = err;
    c->state |= VLW_EV_ERROR;
    if (err == ERR_RST) g_stats.reset_by_peer++; else g_stats.errors++;
    push_ready(c, VLW_EV_ERROR);
}

static err_t on_accept(void *arg, struct tcp_pcb *pcb, err_t err) {
    vlw_listener *l = arg;
    if (err != ERR_OK || !pcb || !l) { g_stats.accept_failed++; return ERR_VAL; }
    vlw_conn *c = calloc(1, sizeof *c);
    if (!c) { g_stats.accept_failed++; return ERR_MEM; }
    c->pcb = pcb;
    c->listener = l;
    c->remote_ip = ip_2_ip4(&pcb->remote_ip)->addr;
    c->remote_port = pcb->remote_port;
    tcp_arg(pcb, c);
    tcp_recv(pcb, on_recv);
    tcp_sent(pcb, on_sent);
    tcp_err(pcb, on_err);
    tcp_nagle_disable(pcb);
    if (g_mtu > 1500) raise_mss(pcb, c->remote_ip, c->remote_port);
    if (l->keepalive_idle_ms > 0) {
        ip_set_option(pcb, SOF_KEEPALIVE);
        pcb->keep_idle = l->keepalive_idle_ms;
        pcb->keep_intvl = 10000;
        pcb->keep_cnt = 5;
    }
    g_stats.accepted++;
    g_stats.active++;
    push_ready(c, VLW_EV_NEW);
    return ERR_OK;
}

// MARK: listeners

vlw_listener *vlw_listen(uint16_t port, int backlog, uint32_t keepalive_idle_ms, int *err) {
    struct tcp_pcb *pcb = tcp_new_ip_type(IPADDR_TYPE_V4);
    if (!pcb) { *err = ERR_MEM; return NULL; }
    ip_set_option(pcb, SOF_REUSEADDR);
    err_t e = tcp_bind(pcb, IP4_ADDR_ANY, port);
    if (e != ERR_OK) { tcp_close(pcb); *err = e; return NULL; }
    struct tcp_pcb *lpcb = tcp_listen_with_backlog_and_err(pcb, (u8_t)(backlog > 255 ? 255 : backlog), &e);
    if (!lpcb) { tcp_close(pcb); *err = e; return NULL; }
    vlw_listener *l = calloc(1, sizeof *l);
    if (!l) { tcp_close(lpcb); *err = ERR_MEM; return NULL; }
    l->pcb = lpcb;
    l->keepalive_idle_ms = keepalive_idle_ms;
    tcp_arg(lpcb, l);
    tcp_accept(lpcb, on_accept);
    *err = 0;
    return l;
}

void vlw_listener_set_user(vlw_listener *l, void *user) { l->user = user; }

// Closed listeners stay allocated (connections accepted through them point at them) and stay
// reachable from here, so that a leak checker does not report them.
static vlw_listener *g_closed_listeners;

void vlw_listener_close(vlw_listener *l) {
    // Connections accepted through it keep a pointer to it: keep the (small) struct.
    if (l->pcb) {
        tcp_arg(l->pcb, NULL); tcp_accept(l->pcb, NULL); tcp_close(l->pcb); l->pcb = NULL;
        l->next_closed = g_closed_listeners;
        g_closed_listeners = l;
    }
    l->user = NULL;
}

// MARK: connections

vlw_conn *vlw_next_ready(uint32_t *events) {
    while (g_ready_head) {
        vlw_conn *c = g_ready_head;
        g_ready_head = c->ready_next;
        if (!g_ready_head) g_ready_tail = NULL;
        c->ready_next = NULL;
        c->in_ready = 0;
        atomic_fetch_sub_explicit(&g_ready_count, 1, memory_order_relaxed);
        if (c->released) { free(c); continue; }
        *events = c->events;
        c->events = 0;
        return c;
    }
    return NULL;
}

void *vlw_conn_user(const vlw_conn *c) { return c->user; }
void vlw_conn_set_user(vlw_conn *c, void *user) { c->user = user; }
void *vlw_conn_listener_user(const vlw_conn *c) { return c->listener ? c->listener->user : NULL; }
uint32_t vlw_conn_remote_ip(const vlw_conn *c) { return c->remote_ip; }
uint16_t vlw_conn_remote_port(const vlw_conn *c) { return c->remote_port; }
size_t vlw_conn_readable(const vlw_conn *c) { return c->rx_len; }
uint32_t vlw_conn_state(const vlw_conn *c) { return c->state; }
int vlw_conn_error(const vlw_conn *c) { return c->err; }

static void recved(struct tcp_pcb *pcb, size_t n) {
    while (n > 0) {
        u16_t k = n > 0xffff ? 0xffff : (u16_t)n;
        tcp_recved(pcb, k);
        n -= k;
    }
}

size_t vlw_conn_read(vlw_conn *c, void *buf, size_t max) {
    size_t n = c->rx_len < max ? c->rx_len : max;
    if (n > 0xffff) n = 0xffff;
    if (n == 0) return 0;
    pbuf_copy_partial(c->rx, buf, (u16_t)n, 0);
    c->rx = pbuf_free_header(c->rx, (u16_t)n);
    c->rx_len -= n;
    if (c->pcb) recved(c->pcb, n);
    g_stats.bytes_read += n;
    return n;
}

size_t vlw_conn_writable(vlw_conn *c) {
    if (!c->pcb) return 0;
    size_t room = tcp_sndqueuelen(c->pcb) >= TCP_SND_QUEUELEN - 2 ? 0 : tcp_sndbuf(c->pcb);
    if (room == 0) { c->want_write = 1; g_stats.write_would_block++; }   // woken when ACKs make room
    return room;
}

long vlw_conn_write(vlw_conn *c, const void *data, size_t len) {
    if (!c->pcb || (c->state & VLW_EV_ERROR)) return -1;
    size_t room = vlw_conn_writable(c);
    if (len > room) len = room;
    if (len == 0) return 0;   // no room: vlw_conn_writable armed the event and counted it
    err_t e = tcp_write(c->pcb, data, (u16_t)len, TCP_WRITE_FLAG_COPY);
    if (e == ERR_MEM) { c->want_write = 1; g_stats.write_would_block++; return 0; }
    if (e != ERR_OK) return -1;
    if (len == room) c->want_write = 1;   // full: tell us when acknowledgements make room
    g_stats.bytes_written += len;
    return (long)len;
}

void vlw_conn_flush(vlw_conn *c) { if (c->pcb) tcp_output(c->pcb); }

int vlw_conn_shutdown_write(vlw_conn *c) {
    if (!c->pcb) return ERR_CONN;
    if (c->tx_shut) return ERR_OK;
    err_t e = tcp_shutdown(c->pcb, 0, 1);
    if (e == ERR_OK) { c->tx_shut = 1; tcp_output(c->pcb); }
    return e;
}

static void release(vlw_conn *c) {
    if (c->rx) { pbuf_free(c->rx); c->rx = NULL; }
    c->rx_len = 0;
    c->user = NULL;
    c->released = 1;
    g_stats.active--;
    if (!c->in_ready) free(c);
}

static void detach(struct tcp_pcb *pcb) {
    tcp_arg(pcb, NULL);
    tcp_recv(pcb, NULL);
    tcp_sent(pcb, NULL);
    tcp_err(pcb, NULL);
}

void vlw_conn_close(vlw_conn *c) {
    if (c->pcb) {
        struct tcp_pcb *pcb = c->pcb;
        detach(pcb);
        // Unread data makes tcp_close send RST (and lose our last response): acknowledge it.
        if (c->rx_len) recved(pcb, c->rx_len);
        if (tcp_close(pcb) != ERR_OK) { tcp_abort(pcb); g_stats.aborted++; }
        c->pcb = NULL;
    }
    g_stats.closed++;
    release(c);
}

void vlw_conn_abort(vlw_conn *c) {
    if (c->pcb) {
        struct tcp_pcb *pcb = c->pcb;
        detach(pcb);
        tcp_abort(pcb);
        c->pcb = NULL;
        g_stats.aborted++;
    }
    g_stats.closed++;
    release(c);
}

vlw_stats vlw_get_stats(void) { return g_stats; }
