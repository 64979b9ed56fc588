/* Packing into the VNNI pair layout (see ukernel.h), with the per-block norms that
 * gemm.c uses to prove int32 chunks safe. Portable C shared by every ISA. */
#ifndef DFPJAX_PACK_H_
#define DFPJAX_PACK_H_

#include <stddef.h>
#include <stdint.h>

/* Pairs per norm block: chunks of int32 accumulation are whole numbers of blocks. */
enum { DFP_NORM_BLOCK_PAIRS = 8 };

/* Packs rows [row0, row0 + width) of a rows x k matrix whose element (r, c) is
 * src[r * row_stride + c * col_stride] into dst[kpairs][width][2] (zero padded), and
 * writes norms[blk] = max over the panel's rows of sum of squares over the block's
 * 2 * DFP_NORM_BLOCK_PAIRS columns. Returns 0, or -1 if an element is -32768
 * (outside the symmetric DFP range, where even one pair could overflow int32). */
int dfp_pack_panel(const int16_t* src, size_t rows, size_t k, size_t row_stride, size_t col_stride,
                   size_t row0, int width, int16_t* dst, int64_t* norms);

static inline size_t dfp_norm_blocks(size_t kpairs) {
  return (kpairs + DFP_NORM_BLOCK_PAIRS - 1) / DFP_NORM_BLOCK_PAIRS;
}

#endif
