// The only header in swift-virtio that includes DPDK. Swift imports `struct rte_mbuf` and
// `struct rte_mempool` as OpaquePointer (they are over-aligned), and rte_pktmbuf_mtod is a
// macro, so the fields the data path touches are reached through the static inline accessors
// below; at -O each compiles to a single load or store inside the Swift caller.
#ifndef VIO_CDPDK_SHIM_H
#define VIO_CDPDK_SHIM_H

#include <rte_config.h>

// Debian builds DPDK for corei7; its inline helpers (rte_memcpy) use SSSE3/SSE4.2 intrinsics.
// Scope that target to the DPDK functions instead of passing -march to every translation unit.
#pragma clang attribute push(__attribute__((target("sse4.2"))), apply_to = function)
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_memory.h>
#include <rte_memzone.h>
#include <rte_malloc.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_eal_memconfig.h>
#pragma clang attribute pop

#include <stdint.h>

static inline int vio_rte_errno(void) { return rte_errno; }
static inline const char *vio_rte_strerror(int e) { return rte_strerror(e); }
static inline uint16_t vio_pktmbuf_headroom(void) { return RTE_PKTMBUF_HEADROOM; }

// mbuf fields (struct rte_mbuf, DPDK 22.11 layout; all in the first cache line but `next`).
static inline void *vio_mbuf_buf_addr(const struct rte_mbuf *m) { return m->buf_addr; }
static inline uint64_t vio_mbuf_buf_iova(const struct rte_mbuf *m) { return m->buf_iova; }
/* Where in struct rte_mbuf the buffer's address for the device lives: buf_addr (process virtual,
   vhost-user) or buf_iova (bus address, virtio-pci). A port keeps one of the two, fixed at setup. */
static inline size_t vio_mbuf_buf_addr_field_offset(void) { return offsetof(struct rte_mbuf, buf_addr); }
static inline size_t vio_mbuf_buf_iova_field_offset(void) { return offsetof(struct rte_mbuf, buf_iova); }
static inline uint16_t vio_mbuf_buf_len(const struct rte_mbuf *m) { return m->buf_len; }
static inline uint16_t vio_mbuf_data_off(const struct rte_mbuf *m) { return m->data_off; }
static inline void vio_mbuf_set_data_off(struct rte_mbuf *m, uint16_t v) { m->data_off = v; }
static inline uint16_t vio_mbuf_data_len(const struct rte_mbuf *m) { return m->data_len; }
static inline void vio_mbuf_set_data_len(struct rte_mbuf *m, uint16_t v) { m->data_len = v; }
static inline uint32_t vio_mbuf_pkt_len(const struct rte_mbuf *m) { return m->pkt_len; }
static inline void vio_mbuf_set_pkt_len(struct rte_mbuf *m, uint32_t v) { m->pkt_len = v; }
static inline uint16_t vio_mbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }
static inline void vio_mbuf_set_nb_segs(struct rte_mbuf *m, uint16_t v) { m->nb_segs = v; }
static inline struct rte_mbuf *vio_mbuf_next(const struct rte_mbuf *m) { return m->next; }
static inline void vio_mbuf_set_next(struct rte_mbuf *m, struct rte_mbuf *n) { m->next = n; }
static inline void vio_mbuf_set_port(struct rte_mbuf *m, uint16_t p) { m->port = p; }
static inline struct rte_mempool *vio_mbuf_pool(const struct rte_mbuf *m) { return m->pool; }
static inline void *vio_mbuf_data(const struct rte_mbuf *m) {
    return (char *)m->buf_addr + m->data_off;
}

// Memory segments, for the vhost-user memory table.
typedef struct vio_memseg_info {
    uint64_t addr;
    uint64_t len;
    int fd;
    uint64_t offset;
} vio_memseg_info;

typedef int (*vio_memseg_visitor)(const vio_memseg_info *info, void *ctx);

struct vio_walk_ctx { vio_memseg_visitor visit; void *ctx; };

static inline int vio_memseg_walk_cb(const struct rte_memseg_list *msl,
                                     const struct rte_memseg *ms, void *arg) {
    struct vio_walk_ctx *w = (struct vio_walk_ctx *)arg;
    if (msl->external) return 0;
    vio_memseg_info info;
    info.addr = (uint64_t)(uintptr_t)ms->addr;
    info.len = ms->len;
    info.fd = rte_memseg_get_fd_thread_unsafe(ms);
    info.offset = 0;
    if (info.fd >= 0 && rte_memseg_get_fd_offset_thread_unsafe(ms, &info.offset) < 0) info.fd = -1;
    return w->visit(&info, w->ctx);
}

/// Visits every allocated memory segment under the memory read lock, with its backing file
/// descriptor and offset (-1 when the segment has no file, e.g. legacy anonymous memory).
static inline int vio_memseg_walk(vio_memseg_visitor visit, void *ctx) {
    struct vio_walk_ctx w = { visit, ctx };
    rte_mcfg_mem_read_lock();
    int rc = rte_memseg_walk_thread_unsafe(vio_memseg_walk_cb, &w);
    rte_mcfg_mem_read_unlock();
    return rc;
}

#endif
