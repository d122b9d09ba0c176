#ifndef EDGEQ_SEMIHOST_H_
#define EDGEQ_SEMIHOST_H_
#include <stdint.h>
int edgeq_semihost_open(const char *path, int mode);
int edgeq_semihost_read(int fd, void *buf, uint32_t n);
int edgeq_semihost_write(int fd, const void *buf, uint32_t n);
int edgeq_semihost_flen(int fd);
void edgeq_semihost_close(int fd);
void edgeq_semihost_puts(const char *s);
void edgeq_semihost_exit(int code);
#endif
