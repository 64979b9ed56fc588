/* The microkernel contract shared by all ISAs.
 *
 * Packed operands use the VNNI pair layout: an A micro-panel is [kpairs][MR][2] int16
 * (row i's pair k is one 32-bit word, broadcast by the kernel), a B micro-panel is
 * [kpairs][NR][2] int16 (NR 32-bit words per pair, loaded as vectors).
 *
 * The kernel adds A_panel x B_panel (kpairs <= DFP_KC_PAIRS) into the int64 tile
 * acc[i * ldc + j], i < MR, j < NR, or with add = 0 stores it there (a tile's first K block,
 * so that the macro-loops need not zero their accumulators). It accumulates in int32 lanes
 * for `chunk` pairs at a time; between chunks a lane may keep its low 16 bits and carry the
 * rest out (into int32 carries, each at most 2**15 a chunk). The caller guarantees (macro.h) that every partial
 * sum within a chunk stays within +-DFP_CHUNK_SUM_MAX = INT32_MAX - 0xffff, so a chunk that
 * starts from a carried remainder below 2**16 never leaves int32, which makes the result
 * exact. chunk = 1 is safe for any input with |m| <= 32767 (2 * 32767**2 < DFP_CHUNK_SUM_MAX).
 * Each path's kernel is an entry of its configuration (isa_config.h). */
#ifndef DFPJAX_UKERNEL_H_
#define DFPJAX_UKERNEL_H_

#include <stddef.h>
#include <stdint.h>

#include "dfp_kernel.h"

typedef void (*dfp_ukernel_fn)(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b,
                               int64_t* acc, size_t ldc, int add);

/* A microkernel with its register tile: MR rows of A by NR columns of B. */
typedef struct {
  int mr, nr;
  dfp_ukernel_fn fn;
} dfp_ukernel;

extern const dfp_ukernel dfp_ukernel_portable;
#if defined(DFPJAX_X86)
extern const dfp_ukernel dfp_ukernel_avx2;
extern const dfp_ukernel dfp_ukernel_avx_vnni;
extern const dfp_ukernel dfp_ukernel_avx512_vnni;
#endif

#endif
