/* Minimal Cortex-M4 startup for the qemu test firmware: vector table, .data copy, .bss zero, FPU on, main(). */
#include <stdint.h>
#include <string.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _stack_top;
int main(void);
void edgeq_semihost_exit(int code);

void Reset_Handler(void) {
  memcpy(&_sdata, &_sidata, (size_t)((char *)&_edata - (char *)&_sdata));
  memset(&_sbss, 0, (size_t)((char *)&_ebss - (char *)&_sbss));
  /* CPACR: full access to CP10/CP11 so -mfloat-abi=hard code may run. */
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;
  __asm volatile("dsb\n isb");
  edgeq_semihost_exit(main());
}

static void Fault_Handler(void) { edgeq_semihost_exit(99); }

__attribute__((section(".vectors"), used)) const void *const edgeq_vectors[16] = {
    &_stack_top, (void *)Reset_Handler, (void *)Fault_Handler, (void *)Fault_Handler,
    (void *)Fault_Handler, (void *)Fault_Handler, (void *)Fault_Handler,
};
