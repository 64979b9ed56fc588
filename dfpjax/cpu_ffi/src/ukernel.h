/* The microkernel contract shared by all ISAs.
 *
 * Packed operands use the VNNI pair layout: an A micro-panel is [kpairs][MR][2] int16
 * (row i's pair k is one 32-bit word, broadcast by the kernel), a B micro-panel is
 * [kpairs][NR][2] int16 (NR 32-bit words per pair, loaded as vectors).
 *
 * The kernel adds A_panel x B_panel into the int64 tile acc[i * ldc + j], i < MR, j < NR. It accumulates
 * in int32 registers for `chunk` pairs at a time and then spills into acc; the
 * caller guarantees (gemm.c) that no partial sum within a chunk leaves int32, which
 * makes the result exact. chunk = 1 is safe for any input with |m| <= 32767. */
#ifndef DFPJAX_UKERNEL_H_
#define DFPJAX_UKERNEL_H_

#include <stddef.h>
#include <stdint.h>

#include "dfp_kernel.h"

typedef void (*dfp_ukernel_fn)(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b,
                               int64_t* acc, size_t ldc);

typedef struct {
  int mr, nr;
  dfp_ukernel_fn fn;
  /* The path's helpers (packing bounds, float32 output stage, quantization) use AVX2; the
   * portable path's do not, so that forcing it runs, and tests, the portable C. */
  int avx2;
} dfp_ukernel;

/* NULL when the ISA is not compiled into this build (for example on non-x86 hosts). */
const dfp_ukernel* dfp_ukernel_for(dfp_isa isa);

extern const dfp_ukernel dfp_ukernel_portable;
#if defined(DFPJAX_X86)
extern const dfp_ukernel dfp_ukernel_avx2;
extern const dfp_ukernel dfp_ukernel_avx_vnni;
extern const dfp_ukernel dfp_ukernel_avx512_vnni;
#endif

#endif
