// Glue between lwIP (Debian's liblwip, NO_SYS=0 with core locking) and a poll-mode virtio-net
// port. Every symbol is prefixed vlw_. lwIP types stay behind this header: Swift sees opaque
// connection and listener handles, plain integers and byte pointers.
//
// Threads and locking. lwIP's tcpip thread (started by vlw_start) runs the stack's timers (TCP
// retransmit/delayed ACK/keep-alive, ARP ageing) under the core lock. The dataplane thread calls
// everything else below with the core lock held (vlw_lock/vlw_unlock, lwIP's LOCK_TCPIP_CORE):
// it feeds received frames to ethernet_input and handles the events lwIP's callbacks recorded.
// linkoutput runs under the lock on either thread and copies each outgoing frame into a buffer
// the tx_alloc callback hands out (an mbuf, appended to the TX burst the dataplane flushes).
#ifndef CVIO_LWIP_H
#define CVIO_LWIP_H
#include <stddef.h>
#include <stdint.h>

typedef struct vlw_conn vlw_conn;
typedef struct vlw_listener vlw_listener;

/// Returns where to copy an outgoing frame of `len` bytes, or NULL when there is no room (the
/// frame is then dropped with ERR_MEM; TCP retransmits). Called with the core lock held.
typedef void *(*vlw_tx_alloc_fn)(void *ctx, uint16_t len);

/// Events a connection collected since the dataplane last looked at it.
enum {
    VLW_EV_NEW = 1,          ///< accepted; not yet seen by the application
    VLW_EV_READABLE = 2,     ///< data arrived
    VLW_EV_WRITABLE = 4,     ///< the peer acknowledged data after a short write
    VLW_EV_PEER_CLOSED = 8,  ///< FIN received: no more data will arrive
    VLW_EV_ERROR = 16,       ///< reset or aborted by the stack; the connection is gone
};

/// Counters kept by the glue (lwIP's own LWIP_STATS are compiled out in Debian's build).
typedef struct {
    uint64_t rx_frames, rx_bytes, rx_dropped, rx_no_pbuf;
    uint64_t tx_frames, tx_bytes, tx_no_buffer, tx_too_big;
    uint64_t accepted, accept_failed, active, closed, aborted, reset_by_peer, errors;
    uint64_t bytes_read, bytes_written, write_would_block;
    uint64_t tx_timer_frames;   ///< of tx_frames, those lwIP's tcpip thread produced (its timers)
    /// Connections whose segments may exceed 1460 bytes (an MTU over 1500 and the peer's SYN
    /// offered a larger MSS), and the largest MSS one of them sends with.
    uint64_t large_mss_connections, largest_mss;
} vlw_stats;

/// Starts lwIP's tcpip thread and adds the one Ethernet interface (address, mask, gateway in
/// network byte order). Once per process. Returns 0, or -1 if it was already started.
int vlw_start(const uint8_t mac[6], uint32_t ip, uint32_t mask, uint32_t gw, uint16_t mtu,
              vlw_tx_alloc_fn tx_alloc, void *ctx);
void vlw_lock(void);
void vlw_unlock(void);

/// Feeds one received Ethernet frame to the stack (copied into a pbuf). Lock held. 0 or -1.
int vlw_input(const void *frame, uint16_t len);

/// Without the lock: is there anything for the dataplane to do (ready connections, frames that
/// linkoutput produced on the tcpip thread)? A hint: a stale answer only delays work one loop.
int vlw_work_pending(void);
/// Adaptive idle: the eventfd lwIP's thread writes when it makes work for a sleeping dataplane.
void vlw_set_wake_fd(int fd);
/// Announces a sleep; returns 1 if nothing is pending (sleep), 0 if work waits (poll again).
int vlw_prepare_sleep(void);
void vlw_end_sleep(void);
/// Lock held: sets the "frames waiting to be sent" hint (cleared after a full flush, set when some stay).
void vlw_set_tx_pending(int pending);

/// Listens on TCP `port` (all local addresses). Lock held. NULL and *err (an lwIP err_t) on failure.
vlw_listener *vlw_listen(uint16_t port, int backlog, uint32_t keepalive_idle_ms, int *err);
void vlw_listener_close(vlw_listener *l);
void vlw_listener_set_user(vlw_listener *l, void *user);

/// The next connection with events, and its events (VLW_EV_*). Lock held.
vlw_conn *vlw_next_ready(uint32_t *events);
void *vlw_conn_user(const vlw_conn *c);
void vlw_conn_set_user(vlw_conn *c, void *user);
/// The listener's user pointer, for a new connection.
void *vlw_conn_listener_user(const vlw_conn *c);
/// Remote IPv4 address (network order) and port.
uint32_t vlw_conn_remote_ip(const vlw_conn *c);
uint16_t vlw_conn_remote_port(const vlw_conn *c);

/// Bytes received and not yet read.
size_t vlw_conn_readable(const vlw_conn *c);
/// Copies up to `max` received bytes out and opens the receive window by as much. Lock held.
size_t vlw_conn_read(vlw_conn *c, void *buf, size_t max);
/// Bytes the send buffer takes now (0 when the connection is gone). Finding no room arms
/// VLW_EV_WRITABLE, so a writer that stops here is woken when acknowledgements free space.
size_t vlw_conn_writable(vlw_conn *c);
/// Queues up to `len` bytes (copied); returns how many were taken, -1 if the connection is gone.
/// A short write arms VLW_EV_WRITABLE. Call vlw_conn_flush after the last write of a batch.
long vlw_conn_write(vlw_conn *c, const void *data, size_t len);
/// Sends what was queued (tcp_output).
void vlw_conn_flush(vlw_conn *c);
/// Half-close: sends FIN after the queued data; receiving goes on. Lock held. 0 or an err_t.
/// Once the peer's FIN also arrived, the glue lets go of the pcb (lwIP ends it by itself).
int vlw_conn_shutdown_write(vlw_conn *c);
/// VLW_EV_PEER_CLOSED / VLW_EV_ERROR state bits (sticky).
uint32_t vlw_conn_state(const vlw_conn *c);
/// The lwIP error that ended the connection (err_t), 0 if none.
int vlw_conn_error(const vlw_conn *c);
/// Graceful close (FIN after queued data); the handle is invalid afterwards. Lock held.
void vlw_conn_close(vlw_conn *c);
/// Reset (RST); the handle is invalid afterwards. Lock held.
void vlw_conn_abort(vlw_conn *c);

/// The MSS option of an Ethernet frame that carries an IPv4 TCP SYN without ACK (0: not such a
/// frame, malformed, or no MSS option), with the sender's address (network order) and port.
/// Reads only within `len`.
uint16_t vlw_syn_mss(const void *frame, uint16_t len, uint32_t *src_ip, uint16_t *src_port);

/// A copy of the counters (lock held for a consistent copy).
vlw_stats vlw_get_stats(void);

// MARK: fastpath.c: this executable's checksum and allocator in place of liblwip's

/// Blocks the allocator handed out: from its free lists, fresh from malloc (a list was empty),
/// and larger than its biggest class (always malloc).
typedef struct {
    uint64_t from_list, from_malloc, large;
} vlw_fastpath_stats;
vlw_fastpath_stats vlw_fastpath_get_stats(void);
/// Which of this file's versions lwIP has called: bit 0 the checksum, bit 1 the allocator
/// (0 after lwIP ran would mean the library's own were bound).
int vlw_fastpath_active(void);
/// The Internet checksum's folded ones'-complement sum (not complemented), as lwIP computes it.
uint16_t vlw_checksum(const void *data, size_t len);
/// liblwip's own lwip_standard_chksum (found past this executable's), or -1 if there is none.
int vlw_library_checksum(const void *data, int len);
/// Calls liblwip's inet_chksum and pbuf_alloc/pbuf_free (which reach the checksum and the
/// allocator through the library's PLT) and returns vlw_fastpath_active() (-1: no pbuf).
int vlw_fastpath_probe(const void *data, uint16_t len);
#endif
