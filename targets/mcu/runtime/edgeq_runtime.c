/* The TVM runtime functions generated kernels may name.  edgeq schedules every
 * kernel without a workspace (the generator rejects kernels.c that calls one),
 * so these exist only to satisfy the ABI: they report failure, never allocate. */
#include <stddef.h>
#include <stdint.h>

#include "tvm/runtime/c_backend_api.h"

void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  (void)device_type, (void)device_id, (void)nbytes, (void)dtype_code_hint, (void)dtype_bits_hint;
  return NULL;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {
  (void)device_type, (void)device_id, (void)ptr;
  return -1;
}
