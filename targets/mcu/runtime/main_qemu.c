/* Test harness for qemu-system-arm (semihosting): reads input.bin (whole samples
 * of MODEL_INPUT_BYTES) from the directory qemu runs in, writes each sample's
 * output to output.bin, exits with 0 or the failing step's code.
 *
 * Each model_run is timed with CMSDK APB timer 0 of the mps2 board (25 MHz,
 * 32-bit down counter); the tick counts go to ticks.bin (uint32 per sample).
 * Under `qemu -icount shift=0` one guest instruction is one virtual ns, so
 * instructions = ticks * 40 (to within one tick). */
#include <stdint.h>

#include "model.h"
#include "semihost.h"

#define TIMER0_CTRL (*(volatile uint32_t *)0x40000000u)
#define TIMER0_VALUE (*(volatile uint32_t *)0x40000004u)
#define TIMER0_RELOAD (*(volatile uint32_t *)0x40000008u)

static model_input_t edgeq_in[(MODEL_INPUT_BYTES + sizeof(model_input_t) - 1) / sizeof(model_input_t)];
static model_output_t edgeq_out[(MODEL_OUTPUT_BYTES + sizeof(model_output_t) - 1) / sizeof(model_output_t)];

int main(void) {
  int fin = edgeq_semihost_open("input.bin", 1);   /* "rb" */
  int fout = edgeq_semihost_open("output.bin", 5); /* "wb" */
  int fticks = edgeq_semihost_open("ticks.bin", 5);
  if (fin < 0 || fout < 0 || fticks < 0) return 2;
  TIMER0_RELOAD = 0xFFFFFFFFu;
  TIMER0_VALUE = 0xFFFFFFFFu;
  TIMER0_CTRL = 1u; /* enable, no interrupt */
  int samples = edgeq_semihost_flen(fin) / MODEL_INPUT_BYTES;
  for (int i = 0; i < samples; ++i) {
    if (edgeq_semihost_read(fin, edgeq_in, MODEL_INPUT_BYTES) != 0) return 3;
    uint32_t start = TIMER0_VALUE;
    if (model_run(edgeq_in, edgeq_out) != 0) return 4;
    uint32_t ticks = start - TIMER0_VALUE;
    if (edgeq_semihost_write(fout, edgeq_out, MODEL_OUTPUT_BYTES) != 0) return 5;
    if (edgeq_semihost_write(fticks, &ticks, sizeof ticks) != 0) return 5;
  }
  edgeq_semihost_close(fin);
  edgeq_semihost_close(fout);
  edgeq_semihost_close(fticks);
  edgeq_semihost_puts("edgeq: done\n");
  return 0;
}
