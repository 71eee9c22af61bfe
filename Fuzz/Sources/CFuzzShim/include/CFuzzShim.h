#ifndef CFUZZSHIM_H
#define CFUZZSHIM_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

// libFuzzer's driver (compiler-rt, linked by -sanitize=fuzzer). SwiftPM gives every executable
// its own entry point (`<module>_main`, aliased to `main` at link time), so libFuzzer's `main`
// is never linked in; each fuzz target's main.swift calls the driver itself.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

// recvmsg into buf (EINTR retried); any descriptors that came with the bytes (SCM_RIGHTS) are
// closed. Returns what recvmsg returned.
ssize_t fuzz_recv_closing_fds(int sock, void *buf, size_t len);

// send with MSG_NOSIGNAL (EINTR retried).
ssize_t fuzz_send(int sock, const void *buf, size_t len);

// rm -rf path (symlinks not followed).
int fuzz_remove_tree(const char *path);

#endif
