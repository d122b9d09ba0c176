/* ARM semihosting calls (bkpt 0xAB) used by the qemu test firmware. */
#include <stdint.h>
#include <string.h>
#include "semihost.h"

static int semihost_call(int op, void *arg) {
  register int r0 __asm__("r0") = op;
  register void *r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

int edgeq_semihost_open(const char *path, int mode) {
  uint32_t args[3] = {(uint32_t)path, (uint32_t)mode, (uint32_t)strlen(path)};
  return semihost_call(0x01, args);
}

int edgeq_semihost_read(int fd, void *buf, uint32_t n) {
  uint32_t args[3] = {(uint32_t)fd, (uint32_t)buf, n};
  return semihost_call(0x06, args); /* bytes NOT read */
}

int edgeq_semihost_write(int fd, const void *buf, uint32_t n) {
  uint32_t args[3] = {(uint32_t)fd, (uint32_t)buf, n};
  return semihost_call(0x05, args);
}

int edgeq_semihost_flen(int fd) {
  uint32_t args[1] = {(uint32_t)fd};
  return semihost_call(0x0C, args);
}

void edgeq_semihost_close(int fd) {
  uint32_t args[1] = {(uint32_t)fd};
  semihost_call(0x02, args);
}

void edgeq_semihost_puts(const char *s) { semihost_call(0x04, (void *)s); }

void edgeq_semihost_exit(int code) {
  /* SYS_EXIT_EXTENDED with ADP_Stopped_ApplicationExit carries the exit code. */
  uint32_t args[2] = {0x20026u, (uint32_t)code};
  semihost_call(0x20, args);
  for (;;) {
  }
}
