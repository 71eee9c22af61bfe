// Faster versions of six of liblwip's own functions (the checksum, the copy with checksum, and
// the four of its heap), defined here so that they take the place of the library's.
//
// Debian's liblwip.so calls its exported functions through its PLT (it is not linked with
// -Bsymbolic), so a definition with the same name in the executable interposes on the
// library's: the dynamic linker binds every call, inside the library too, to the first
// definition in load order, and the executable comes first. Checked on liblwip 2.1.3+dfsg1-2:
// tcp_write's copy goes `lwip_chksum_copy@plt`, which calls `memcpy@plt` then
// `lwip_standard_chksum@plt`; every pbuf, segment and pcb is `memp_malloc` / `mem_malloc` →
// `malloc@plt`. `vlw_fastpath_active()` tells whether the executable's versions are the ones
// bound (the test suite asserts it).
//
// 1. The Internet checksum (RFC 1071). The library's `lwip_standard_chksum` adds one 16-bit word
//    per step; every byte a connection sends goes through it once (LWIP_CHECKSUM_ON_COPY: in
//    tcp_write's copy) and every byte it receives once (tcp_input). This one adds 8 bytes per
//    step. The result is the same value, bit for bit: both are the ones'-complement sum of the
//    bytes taken as 16-bit words in memory order, starting at the pointer (whatever its
//    alignment), folded to 16 bits, not complemented; 0 only when every byte is 0.
// 2. `lwip_chksum_copy` (copy, then checksum the copy while it is still in L1).
// 3. `mem_malloc`, `mem_calloc`, `mem_free`, `mem_trim`: Debian builds lwIP with MEM_LIBC_MALLOC
//    and MEMP_MEM_MALLOC, so each segment (pbuf of ~1.6 KiB, tcp_seg) is a malloc and a free.
//    glibc's thread cache stops at 1032 bytes, so a segment's pbuf takes the slow path of
//    malloc and free every time. These keep freed blocks of up to 2 KiB on a free list per size
//    class (LIFO: the next segment reuses a block still in cache), and up to 9.4 KiB for the
//    segments of an MTU of 9000. Larger blocks go to malloc. A list holds at most `kClassCap`
//    blocks and 16 MiB; beyond that they go back to free().
//    lwIP allocates with the core lock held, and also without it (tcpip_callback from other
//    threads), so each list has its own small spin lock.
#define _GNU_SOURCE
#include <lwip/opt.h>
#include <lwip/mem.h>
#include <lwip/inet_chksum.h>
#include <lwip/pbuf.h>
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "CVioLwIP.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fastpath.c's checksum assumes a little-endian machine"
#endif

// MARK: checksum

static inline uint16_t fold(uint64_t s) {
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    return (uint16_t)s;
}

// 2^32 ≡ 1 and 2^16 ≡ 1 (mod 0xffff): the sum of the 32-bit halves of 8-byte words, kept in
// 64 bits (no overflow below 2^32 words), is congruent to the sum of the 16-bit words.
static inline uint64_t sum_bytes(const uint8_t *p, size_t len) {
    uint64_t a = 0, b = 0;
    while (len >= 16) {
        uint64_t w0, w1;
        memcpy(&w0, p, 8);
        memcpy(&w1, p + 8, 8);
        a += (w0 & 0xffffffffu) + (w0 >> 32);
        b += (w1 & 0xffffffffu) + (w1 >> 32);
        p += 16; len -= 16;
    }
    if (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        a += (w & 0xffffffffu) + (w >> 32);
        p += 8; len -= 8;
    }
    if (len >= 4) { uint32_t w; memcpy(&w, p, 4); b += w; p += 4; len -= 4; }
    if (len >= 2) { uint16_t w; memcpy(&w, p, 2); a += w; p += 2; len -= 2; }
    if (len) a += *p;   // the last byte with a zero after it, read as a little-endian word
    return a + b;
}

uint16_t vlw_checksum(const void *data, size_t len) { return fold(sum_bytes(data, len)); }

static _Atomic int g_chksum_used;

// Marks first use without writing the shared line on every call.
static inline void mark(_Atomic int *flag) {
    if (!atomic_load_explicit(flag, memory_order_relaxed)) atomic_store_explicit(flag, 1, memory_order_relaxed);
}

u16_t lwip_standard_chksum(const void *dataptr, int len) {
    mark(&g_chksum_used);
    return len > 0 ? fold(sum_bytes(dataptr, (size_t)len)) : 0;
}

u16_t lwip_chksum_copy(void *dst, const void *src, u16_t len) {
    memcpy(dst, src, len);
    return fold(sum_bytes(dst, len));
}

// MARK: allocator

// A block's header: its class (or kLarge), kept 16 bytes so that the payload stays aligned as
// malloc's is.
typedef struct { uint32_t cls; uint32_t magic; uint64_t pad; } block_header;
_Static_assert(sizeof(block_header) == 16, "header keeps 16-byte alignment");
// The classes above 2 KiB hold the segments of connections with a large MSS (MTU 9000).
enum { kClasses = 8, kLarge = 0xffffffffu, kMagic = 0x766c7746u /* "Fwlv" */, kClassCap = 4096,
       kClassBytesCap = 16 << 20 };
static const size_t kClassSize[kClasses] = { 64, 128, 256, 512, 1024, 2048, 4096, 9216 + 256 };

typedef struct free_block { struct free_block *next; } free_block;
// A class's list, lock and counters share a cache line of their own.
static struct {
    atomic_flag lock;
    uint32_t count;
    free_block *head;
    uint64_t from_list, from_malloc;   // counted with the lock held
} __attribute__((aligned(64))) g_class[kClasses] = {
    { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 }, { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 }, { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 },
    { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 }, { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 }, { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 },
    { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 }, { ATOMIC_FLAG_INIT, 0, NULL, 0, 0 },
};
static atomic_ulong g_large;
static _Atomic int g_used;

static inline void lock_class(int c) {
    while (atomic_flag_test_and_set_explicit(&g_class[c].lock, memory_order_acquire)) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
}
static inline void unlock_class(int c) { atomic_flag_clear_explicit(&g_class[c].lock, memory_order_release); }

static inline int class_of(size_t size) {
    for (int c = 0; c < kClasses; c++) if (size <= kClassSize[c]) return c;
    return -1;
}

void *mem_malloc(mem_size_t size) {
    mark(&g_used);
    int c = class_of(size);
    block_header *h;
    if (c < 0) {
        h = malloc(sizeof *h + size);
        if (!h) return NULL;
        h->cls = kLarge;
        atomic_fetch_add_explicit(&g_large, 1, memory_order_relaxed);
    } else {
        lock_class(c);
        free_block *f = g_class[c].head;
        if (f) { g_class[c].head = f->next; g_class[c].count--; g_class[c].from_list++; }
        else g_class[c].from_malloc++;
        unlock_class(c);
        if (f) {
            h = (block_header *)f;
        } else {
            h = malloc(sizeof *h + kClassSize[c]);
            if (!h) return NULL;
        }
        h->cls = (uint32_t)c;
    }
    h->magic = kMagic;
    return h + 1;
}

void *mem_calloc(mem_size_t count, mem_size_t size) {
    size_t n = (size_t)count * size;
    void *p = mem_malloc((mem_size_t)n);
    if (p) memset(p, 0, n);
    return p;
}

void mem_free(void *mem) {
    if (!mem) return;
    block_header *h = (block_header *)mem - 1;
    if (h->magic != kMagic) abort();   // not one of ours: lwIP freed memory it did not get here
    h->magic = 0;
    uint32_t c = h->cls;
    if (c >= kClasses) { free(h); return; }
    lock_class((int)c);
    if (g_class[c].count < kClassCap && (g_class[c].count + 1) * kClassSize[c] <= kClassBytesCap) {
        free_block *f = (free_block *)h;
        f->next = g_class[c].head;
        g_class[c].head = f;
        g_class[c].count++;
        h = NULL;
    }
    unlock_class((int)c);
    if (h) free(h);
}

// lwIP only shrinks (pbuf_realloc); a block keeps its size class, as with the library's own
// MEM_LIBC_MALLOC build, where mem_trim returns the block unchanged.
void *mem_trim(void *mem, mem_size_t size) { (void)size; return mem; }

vlw_fastpath_stats vlw_fastpath_get_stats(void) {
    vlw_fastpath_stats s = { .large = atomic_load_explicit(&g_large, memory_order_relaxed) };
    for (int c = 0; c < kClasses; c++) {
        lock_class(c);
        s.from_list += g_class[c].from_list;
        s.from_malloc += g_class[c].from_malloc;
        unlock_class(c);
    }
    return s;
}

// Both versions of each function give the same results, so tell them apart by a mark that only
// these set once lwIP has called them: bit 0, the checksum; bit 1, the allocator.
int vlw_fastpath_active(void) {
    return atomic_load_explicit(&g_chksum_used, memory_order_relaxed)
         | atomic_load_explicit(&g_used, memory_order_relaxed) << 1;
}

// MARK: for the tests

int vlw_library_checksum(const void *data, int len) {
    // The next definition after this executable's: liblwip's own.
    u16_t (*lib)(const void *, int) = (u16_t (*)(const void *, int))dlsym(RTLD_NEXT, "lwip_standard_chksum");
    if (!lib || lib == lwip_standard_chksum) return -1;
    return lib(data, len);
}

int vlw_fastpath_probe(const void *data, uint16_t len) {
    // Library code that reaches the checksum and the allocator through its PLT.
    (void)inet_chksum(data, len);
    struct pbuf *p = pbuf_alloc(PBUF_RAW, len, PBUF_RAM);
    if (!p) return -1;
    pbuf_free(p);
    return vlw_fastpath_active();
}
