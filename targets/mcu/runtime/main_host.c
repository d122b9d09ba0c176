/* Host test harness: host_runner INPUT.bin OUTPUT.bin (same format as main_qemu.c). */
#include <stdio.h>

#include "model.h"

static model_input_t edgeq_in[(MODEL_INPUT_BYTES + sizeof(model_input_t) - 1) / sizeof(model_input_t)];
static model_output_t edgeq_out[(MODEL_OUTPUT_BYTES + sizeof(model_output_t) - 1) / sizeof(model_output_t)];

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s input.bin output.bin\n", argv[0]);
    return 2;
  }
  FILE *fin = fopen(argv[1], "rb"), *fout = fopen(argv[2], "wb");
  if (!fin || !fout) return 2;
  while (fread(edgeq_in, 1, MODEL_INPUT_BYTES, fin) == MODEL_INPUT_BYTES) {
    if (model_run(edgeq_in, edgeq_out) != 0) return 4;
    if (fwrite(edgeq_out, 1, MODEL_OUTPUT_BYTES, fout) != MODEL_OUTPUT_BYTES) return 5;
  }
  fclose(fin);
  fclose(fout);
  return 0;
}
