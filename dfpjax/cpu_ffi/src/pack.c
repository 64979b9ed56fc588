#include "pack.h"

#include <string.h>

enum {
  MAX_WIDTH = 64,                             /* widest micro-panel of any ISA */
  NORM_BLOCK = 2 * DFP_NORM_BLOCK_PAIRS,      /* elements per norm block */
  BLOCKS_PER_KC = DFP_KC_PAIRS / DFP_NORM_BLOCK_PAIRS,
};

/* Copies columns [c0, c1) of the panel's valid rows (c0 even) into dst[pair][width][2]. */
static inline __attribute__((always_inline)) void copy_block(const int16_t* src, size_t c0, size_t c1, size_t row_stride,
                       size_t col_stride, size_t valid, int width, int16_t* dst) {
  const size_t pairs = (c1 - c0) / 2;
  if (col_stride == 1) {
    /* Rows contiguous in k: each row's pairs are consecutive 32-bit words. */
    uint32_t* out = (uint32_t*)dst;
    for (size_t i = 0; i < valid; ++i) {
      const int16_t* row = src + i * row_stride + c0;
      for (size_t p = 0; p < pairs; ++p) {
        uint32_t w;
        memcpy(&w, row + 2 * p, sizeof w);
        out[p * (size_t)width + i] = w;
      }
      if ((c1 - c0) & 1) out[pairs * (size_t)width + i] = (uint16_t)row[c1 - c0 - 1];
    }
  } else {
    /* Rows contiguous at fixed k: interleave two k-rows of the panel per pair. */
    for (size_t p = 0; p < pairs; ++p) {
      const int16_t* in0 = src + (c0 + 2 * p) * col_stride;
      const int16_t* in1 = in0 + col_stride;
      int16_t* o = dst + p * (size_t)width * 2;
      for (size_t i = 0; i < valid; ++i) {
        o[2 * i] = in0[i];
        o[2 * i + 1] = in1[i];
      }
    }
    if ((c1 - c0) & 1) {
      const int16_t* in0 = src + (c1 - 1) * col_stride;
      int16_t* o = dst + pairs * (size_t)width * 2;
      for (size_t i = 0; i < valid; ++i) o[2 * i] = in0[i];
    }
  }
}

/* Squared norm of each lane (row) over each norm block of a packed K block. */
static inline __attribute__((always_inline)) void block_norms(const int16_t* dst, size_t kpairs, int width,
                        uint64_t sq[BLOCKS_PER_KC][MAX_WIDTH]) {
  for (size_t p0 = 0, blk = 0; p0 < kpairs; p0 += DFP_NORM_BLOCK_PAIRS, ++blk) {
    const size_t p1 = p0 + DFP_NORM_BLOCK_PAIRS < kpairs ? p0 + DFP_NORM_BLOCK_PAIRS : kpairs;
    uint64_t* s = sq[blk];
    for (int i = 0; i < width; ++i) s[i] = 0;
    for (size_t p = p0; p < p1; ++p) {
      const int16_t* v = dst + p * (size_t)width * 2;
      for (int i = 0; i < width; ++i)  /* a pair's two squares stay below 2**31 */
        s[i] += (uint32_t)((int32_t)v[2 * i] * v[2 * i] + (int32_t)v[2 * i + 1] * v[2 * i + 1]);
    }
  }
}

static inline __attribute__((always_inline)) int16_t lowest(const int16_t* v, size_t n) {
  int16_t low = 0;
  for (size_t i = 0; i < n; ++i) low = v[i] < low ? v[i] : low;
  return low;
}

#if defined(DFPJAX_X86)
__attribute__((target_clones("avx2", "default")))
#endif
int dfp_block_bounds(const int16_t* block, size_t kpairs, int width, uint64_t* bounds) {
  uint64_t sq[BLOCKS_PER_KC][MAX_WIDTH];
  block_norms(block, kpairs, width, sq);
  /* Level 0: the panel's largest row norm per norm block; level l + 1 sums pairs of
   * level-l chunks. Each level's bound is its largest chunk. */
  uint64_t chunk[BLOCKS_PER_KC];
  size_t count = (kpairs + DFP_NORM_BLOCK_PAIRS - 1) / DFP_NORM_BLOCK_PAIRS;
  for (size_t b = 0; b < count; ++b) {
    uint64_t m = 0;
    for (int i = 0; i < width; ++i) m = sq[b][i] > m ? sq[b][i] : m;
    chunk[b] = m;
  }
  for (int level = 0; level < DFP_CHUNK_LEVELS; ++level) {
    uint64_t m = 0;
    for (size_t b = 0; b < count; ++b) m = chunk[b] > m ? chunk[b] : m;
    bounds[level] = m;
    for (size_t b = 0; b < count / 2; ++b) chunk[b] = chunk[2 * b] + chunk[2 * b + 1];
    if (count & 1) chunk[count / 2] = chunk[count - 1];
    count = (count + 1) / 2;
  }
  return lowest(block, kpairs * (size_t)width * 2) == INT16_MIN ? -1 : 0;
}

/* Packing is a fifth of the GEMM's time: build it for AVX2 as well as the baseline. */
#if defined(DFPJAX_X86)
__attribute__((target_clones("avx2", "default")))
#endif
int dfp_pack_panel(const int16_t* src, size_t rows, size_t k, size_t row_stride, size_t col_stride,
                   size_t row0, int width, int16_t* dst, uint64_t* bounds) {
  const size_t kpairs = (k + 1) / 2;
  const size_t valid = rows - row0 < (size_t)width ? rows - row0 : (size_t)width;
  src += row0 * row_stride;
  memset(dst, 0, kpairs * (size_t)width * 2 * sizeof(int16_t));
  int status = 0;
  for (size_t c0 = 0; c0 < k; c0 += 2 * DFP_KC_PAIRS, bounds += DFP_CHUNK_LEVELS) {
    const size_t c1 = c0 + 2 * DFP_KC_PAIRS < k ? c0 + 2 * DFP_KC_PAIRS : k;
    int16_t* block = dst + (c0 / 2) * (size_t)width * 2;
    copy_block(src, c0, c1, row_stride, col_stride, valid, width, block);
    status |= dfp_block_bounds(block, (c1 - c0 + 1) / 2, width, bounds);
  }
  return status;
}
