/* Packing into the VNNI pair layout (see ukernel.h), with the norm summaries that
 * gemm.c uses to prove int32 chunks safe. Portable C shared by every ISA. */
#ifndef DFPJAX_PACK_H_
#define DFPJAX_PACK_H_

#include <stddef.h>
#include <stdint.h>

enum {
  DFP_KC_PAIRS = 256,      /* K block in pairs: a B micro-panel of KC x NR stays in L1 */
  DFP_NORM_BLOCK_PAIRS = 8,/* the shortest chunk a norm bound is kept for */
  DFP_CHUNK_LEVELS = 6,    /* chunks of 8, 16, ..., 256 pairs */
};

/* Packs rows [row0, row0 + width) of a rows x k matrix whose element (r, c) is
 * src[r * row_stride + c * col_stride] (one of the strides is 1) into
 * dst[kpairs][width][2], zero padded. For each K block of DFP_KC_PAIRS pairs it writes
 * DFP_CHUNK_LEVELS bounds: bound[l] = the largest, over the block's chunks of
 * DFP_NORM_BLOCK_PAIRS << l pairs, of the sum over the chunk's norm blocks of the
 * largest squared row norm in the panel. Returns -1 if an element is -32768 (outside
 * the symmetric DFP range, where even one pair could overflow int32), else 0. avx2 selects
 * the AVX2 bounds (dfp_ukernel.avx2). */
int dfp_pack_panel(const int16_t* src, size_t rows, size_t k, size_t row_stride, size_t col_stride,
                   size_t row0, int width, int16_t* dst, uint64_t* bounds, int avx2);

/* The bounds above for one packed K block dst[kpairs][width][2] (kpairs <= DFP_KC_PAIRS,
 * width <= 64); -1 if an element is -32768, else 0. For packers of other sources (im2col.c). */
int dfp_block_bounds(const int16_t* block, size_t kpairs, int width, uint64_t* bounds, int avx2);

static inline size_t dfp_kc_blocks(size_t kpairs) {
  return (kpairs + DFP_KC_PAIRS - 1) / DFP_KC_PAIRS;
}

#endif
