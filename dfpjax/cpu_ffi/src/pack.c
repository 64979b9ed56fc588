#include "pack.h"

#include <string.h>

enum {
  MAX_WIDTH = 64,                             /* widest micro-panel of any ISA */
  NORM_BLOCK = 2 * DFP_NORM_BLOCK_PAIRS,      /* elements per norm block */
  BLOCKS_PER_KC = DFP_KC_PAIRS / DFP_NORM_BLOCK_PAIRS,
};

/* Copies columns [c0, c1) of the panel (c0 even) and accumulates each row's squared norm
 * per norm block of the K block into sq. Returns the smallest element seen. */
static int16_t copy_block(const int16_t* src, size_t c0, size_t c1, size_t row_stride,
                          size_t col_stride, size_t valid, int width, int16_t* dst,
                          uint64_t sq[BLOCKS_PER_KC][MAX_WIDTH]) {
  int16_t lowest = 0;
  uint32_t* out = (uint32_t*)dst;
  const size_t full_pairs = (c1 - c0) / 2;
  if (col_stride == 1) {
    /* Rows contiguous in k: each row's pairs are consecutive 32-bit words. */
    for (size_t i = 0; i < valid; ++i) {
      const int16_t* row = src + i * row_stride + c0;
      for (size_t p = 0; p < full_pairs; ++p) {
        uint32_t w;
        memcpy(&w, row + 2 * p, sizeof w);
        out[p * (size_t)width + i] = w;
      }
      if ((c1 - c0) & 1) out[full_pairs * (size_t)width + i] = (uint16_t)row[c1 - c0 - 1];
      for (size_t c = 0; c < c1 - c0; c += NORM_BLOCK) {
        const size_t end = c + NORM_BLOCK < c1 - c0 ? c + NORM_BLOCK : c1 - c0;
        int64_t s = 0;
        int16_t low = 0;
        for (size_t cc = c; cc < end; ++cc) {
          s += (int32_t)row[cc] * row[cc];
          low = row[cc] < low ? row[cc] : low;
        }
        sq[c / NORM_BLOCK][i] = (uint64_t)s;
        lowest = low < lowest ? low : lowest;
      }
    }
  } else {
    /* Rows contiguous at fixed k: interleave two k-rows of the panel per pair. */
    for (size_t p = 0; p * 2 < c1 - c0; ++p) {
      const int16_t* in0 = src + (c0 + 2 * p) * col_stride;
      const int16_t* in1 = c0 + 2 * p + 1 < c1 ? in0 + col_stride : NULL;
      int16_t* o = dst + p * (size_t)width * 2;
      uint64_t* s = sq[2 * p / NORM_BLOCK];
      int16_t low = 0;
      for (size_t i = 0; i < valid; ++i) {
        const int16_t v0 = in0[i], v1 = in1 ? in1[i] : 0;
        o[2 * i] = v0;
        o[2 * i + 1] = v1;
        s[i] += (uint32_t)((int32_t)v0 * v0 + (int32_t)v1 * v1);
        low = v0 < low ? v0 : low;
        low = v1 < low ? v1 : low;
      }
      lowest = low < lowest ? low : lowest;
    }
  }
  return lowest;
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
  int16_t lowest = 0;
  for (size_t c0 = 0; c0 < k; c0 += 2 * DFP_KC_PAIRS, bounds += DFP_CHUNK_LEVELS) {
    const size_t c1 = c0 + 2 * DFP_KC_PAIRS < k ? c0 + 2 * DFP_KC_PAIRS : k;
    uint64_t sq[BLOCKS_PER_KC][MAX_WIDTH];
    memset(sq, 0, sizeof sq);
    const int16_t low = copy_block(src, c0, c1, row_stride, col_stride, valid, width,
                                   dst + (c0 / 2) * (size_t)width * 2, sq);
    lowest = low < lowest ? low : lowest;
    /* Level 0: the panel's largest row norm per norm block; level l + 1 sums pairs of
     * level-l chunks. Each level's bound is its largest chunk. */
    uint64_t chunk[BLOCKS_PER_KC];
    size_t count = (c1 - c0 + NORM_BLOCK - 1) / NORM_BLOCK;
    for (size_t b = 0; b < count; ++b) {
      uint64_t m = 0;
      for (size_t i = 0; i < valid; ++i) m = sq[b][i] > m ? sq[b][i] : m;
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
  }
  return lowest == INT16_MIN ? -1 : 0;
}
