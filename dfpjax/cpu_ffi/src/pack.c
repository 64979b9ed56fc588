#include "pack.h"

#include <string.h>

int dfp_pack_panel(const int16_t* src, size_t rows, size_t k, size_t row_stride, size_t col_stride,
                   size_t row0, int width, int16_t* dst, int64_t* norms) {
  const size_t kpairs = (k + 1) / 2;
  const size_t valid = rows - row0 < (size_t)width ? rows - row0 : (size_t)width;
  memset(dst, 0, kpairs * (size_t)width * 2 * sizeof(int16_t));
  memset(norms, 0, dfp_norm_blocks(kpairs) * sizeof(int64_t));
  int bad = 0;
  for (size_t i = 0; i < valid; ++i) {
    const int16_t* row = src + (row0 + i) * row_stride;
    int16_t* out = dst + 2 * i;
    int64_t sumsq = 0;
    size_t blk = 0;
    for (size_t c = 0; c < k; ++c) {
      const int16_t v = row[c * col_stride];
      bad |= v == INT16_MIN;
      out[(c >> 1) * (size_t)width * 2 + (c & 1)] = v;
      sumsq += (int32_t)v * v;
      if ((c + 1) % (2 * DFP_NORM_BLOCK_PAIRS) == 0 || c + 1 == k) {
        if (sumsq > norms[blk]) norms[blk] = sumsq;
        sumsq = 0;
        ++blk;
      }
    }
  }
  return bad ? -1 : 0;
}
