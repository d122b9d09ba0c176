/* Test harness for qemu-system-arm (semihosting): reads input.bin (whole samples
 * of MODEL_INPUT_BYTES) from the directory qemu runs in, writes each sample's
 * output to output.bin, exits with 0 or the failing step's code. */
#include <stdint.h>

#include "model.h"
#include "semihost.h"

static model_input_t edgeq_in[(MODEL_INPUT_BYTES + sizeof(model_input_t) - 1) / sizeof(model_input_t)];
static model_output_t edgeq_out[(MODEL_OUTPUT_BYTES + sizeof(model_output_t) - 1) / sizeof(model_output_t)];

int main(void) {
  int fin = edgeq_semihost_open("input.bin", 1);   /* "rb" */
  int fout = edgeq_semihost_open("output.bin", 5); /* "wb" */
  if (fin < 0 || fout < 0) return 2;
  int samples = edgeq_semihost_flen(fin) / MODEL_INPUT_BYTES;
  for (int i = 0; i < samples; ++i) {
    if (edgeq_semihost_read(fin, edgeq_in, MODEL_INPUT_BYTES) != 0) return 3;
    if (model_run(edgeq_in, edgeq_out) != 0) return 4;
    if (edgeq_semihost_write(fout, edgeq_out, MODEL_OUTPUT_BYTES) != 0) return 5;
  }
  edgeq_semihost_close(fin);
  edgeq_semihost_close(fout);
  edgeq_semihost_puts("edgeq: done\n");
  return 0;
}
