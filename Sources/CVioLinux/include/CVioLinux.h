// Linux shims for swift-virtio: the CMSG_* macros for SCM_RIGHTS, CPU affinity macros and a few
// calls whose flags are macros. Every symbol is prefixed cvio_.
#ifndef CVIO_LINUX_H
#define CVIO_LINUX_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// sendmsg() of `len` bytes with up to 8 descriptors attached as SCM_RIGHTS. Returns bytes sent or -1/errno.
ssize_t cvio_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
/// recvmsg() into buf; received descriptors (up to max_fds) land in fds and *nfds. Returns bytes or -1/errno.
ssize_t cvio_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds);
/// The CPUs in this thread's affinity mask, ascending, written into cpus. Returns the count or -1.
int cvio_affinity_cpus(int *cpus, int max);
/// Pins the calling thread to one CPU. Returns 0 or -1/errno.
int cvio_pin_thread(int cpu);
/// eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC).
int cvio_eventfd(void);
/// accept4(SOCK_CLOEXEC) on a listening socket (hidden behind _GNU_SOURCE in Swift).
int cvio_accept_cloexec(int sock);
/// memfd_create(name, MFD_CLOEXEC) (used by tests to hand shared memory to a fake backend).
int cvio_memfd(const char *name);
/// Installs `handler` for SIGINT and SIGTERM without SA_RESTART.
int cvio_install_stop_handler(void (*handler)(int));
/// The time stamp counter.
static inline uint64_t cvio_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

// Device register access for virtio-pci (a mapped BAR): volatile loads and stores of one width,
// so the compiler neither merges, splits, nor drops them.
static inline uint8_t cvio_mmio_read8(const void *p) { return *(const volatile uint8_t *)p; }
static inline uint16_t cvio_mmio_read16(const void *p) { return *(const volatile uint16_t *)p; }
static inline uint32_t cvio_mmio_read32(const void *p) { return *(const volatile uint32_t *)p; }
static inline void cvio_mmio_write8(void *p, uint8_t v) { *(volatile uint8_t *)p = v; }
static inline void cvio_mmio_write16(void *p, uint16_t v) { *(volatile uint16_t *)p = v; }
static inline void cvio_mmio_write32(void *p, uint32_t v) { *(volatile uint32_t *)p = v; }
#endif
