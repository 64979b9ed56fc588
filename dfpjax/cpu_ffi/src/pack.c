#include "pack.h"

#include <string.h>

enum { BLOCKS_PER_KC = DFP_KC_PAIRS / DFP_NORM_BLOCK_PAIRS };

void dfp_pack_rows_from(const int16_t* src, size_t first, size_t pairs, size_t row_stride,
                        size_t valid, int width, uint32_t* out) {
  for (size_t i = 0; i < valid; ++i) {
    const int16_t* row = src + i * row_stride;
    for (size_t p = first; p < pairs; ++p) {
      uint32_t w;
      memcpy(&w, row + 2 * p, sizeof w);
      out[p * (size_t)width + i] = w;
    }
  }
}

void dfp_pack_rows_portable(const int16_t* src, size_t pairs, size_t row_stride, size_t valid,
                            int width, uint32_t* out) {
  dfp_pack_rows_from(src, 0, pairs, row_stride, valid, width, out);
}

void dfp_pack_columns_portable(const int16_t* src, size_t pairs, size_t col_stride, size_t valid,
                               int width, int16_t* out, size_t panel_stride) {
  for (size_t p = 0; p < pairs; ++p) {
    const int16_t* in0 = src + 2 * p * col_stride;
    const int16_t* in1 = in0 + col_stride;
    for (size_t l0 = 0, q = 0; l0 < valid; l0 += (size_t)width, ++q) {
      int16_t* o = out + q * panel_stride + p * (size_t)width * 2;
      const size_t lanes = valid - l0 < (size_t)width ? valid - l0 : (size_t)width;
      for (size_t i = 0; i < lanes; ++i) {
        o[2 * i] = in0[l0 + i];
        o[2 * i + 1] = in1[l0 + i];
      }
    }
  }
}

void dfp_interleave_pairs_portable(const int16_t* in0, const int16_t* in1, size_t n, int16_t* out) {
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = in0[i];
    out[2 * i + 1] = in1[i];
  }
}

void dfp_pack_block(const dfp_isa_config* cfg, const int16_t* src, size_t c0, size_t c1,
                    size_t row_stride, size_t col_stride, size_t valid, int width, int16_t* dst,
                    size_t panel_stride) {
  const size_t pairs = (c1 - c0) / 2;
  const int odd = (c1 - c0) & 1;
  if (col_stride == 1) {
    /* Rows contiguous in k: each row's pairs are consecutive 32-bit words, a panel at a time. */
    for (size_t r0 = 0; r0 < valid; r0 += (size_t)width, dst += panel_stride) {
      const size_t rows = valid - r0 < (size_t)width ? valid - r0 : (size_t)width;
      const int16_t* in = src + r0 * row_stride;
      uint32_t* out = (uint32_t*)dst;
      cfg->pack_rows(in + c0, pairs, row_stride, rows, width, out);
      if (odd)
        for (size_t i = 0; i < rows; ++i) out[pairs * (size_t)width + i] = (uint16_t)in[i * row_stride + c1 - 1];
    }
  } else {
    /* Rows contiguous at fixed k: interleave two k-rows of all the panels per pair. */
    cfg->pack_columns(src + c0 * col_stride, pairs, col_stride, valid, width, dst, panel_stride);
    if (odd) {
      const int16_t* in0 = src + (c1 - 1) * col_stride;
      for (size_t i = 0; i < valid; ++i)
        dst[i / (size_t)width * panel_stride + (pairs * (size_t)width + i % (size_t)width) * 2] = in0[i];
    }
  }
}

int dfp_norm_bounds_portable(const int16_t* block, size_t kpairs, int width, uint64_t* bounds) {
  /* Per row: its squared norm over each norm block, then over chunks of two of the level
   * below; each level's bound is its largest chunk over all rows. */
  int low = 0;
  for (int level = 0; level < DFP_NORM_LEVELS; ++level) bounds[level] = 0;
  for (int i = 0; i < width; ++i) {
    uint64_t chunk[BLOCKS_PER_KC];
    size_t count = 0;
    for (size_t p0 = 0; p0 < kpairs; p0 += DFP_NORM_BLOCK_PAIRS, ++count) {
      const size_t p1 = p0 + DFP_NORM_BLOCK_PAIRS < kpairs ? p0 + DFP_NORM_BLOCK_PAIRS : kpairs;
      chunk[count] = 0;
      for (size_t p = p0; p < p1; ++p) {
        const int16_t* v = block + (p * (size_t)width + (size_t)i) * 2;
        low |= v[0] == INT16_MIN || v[1] == INT16_MIN;
        chunk[count] += (uint64_t)((int32_t)v[0] * v[0]) + (uint64_t)((int32_t)v[1] * v[1]);
      }
    }
    for (int level = 0; level < DFP_NORM_LEVELS; ++level) {
      for (size_t b = 0; b < count; ++b) bounds[level] = chunk[b] > bounds[level] ? chunk[b] : bounds[level];
      for (size_t b = 0; b < count / 2; ++b) chunk[b] = chunk[2 * b] + chunk[2 * b + 1];
      if (count & 1) chunk[count / 2] = chunk[count - 1];
      count = (count + 1) / 2;
    }
  }
  return low;
}

int dfp_block_bounds(const dfp_isa_config* cfg, const int16_t* block, size_t kpairs, int width,
                     uint64_t* bounds) {
  for (int level = 0; level < DFP_FINE_LEVELS; ++level) bounds[level] = DFP_BOUND_UNTAKEN;
  return cfg->norm_bounds(block, kpairs, width, bounds + DFP_FINE_LEVELS) ? -1 : 0;
}

void dfp_fine_bounds_portable(const int16_t* block, size_t kpairs, int width, uint64_t* bounds) {
  /* Four pairs of every row at a time: each row's squares over the two halves, then their largest. */
  uint32_t two = 0, four = 0;
  for (size_t p0 = 0; p0 < kpairs; p0 += 4) {
    uint32_t half[2][64] = {{0}};
    for (size_t p = p0; p < p0 + 4 && p < kpairs; ++p) {
      const int16_t* v = block + p * (size_t)width * 2;
      uint32_t* sum = half[(p - p0) / 2];
      for (int i = 0; i < width; ++i)
        sum[i] += (uint32_t)((int32_t)v[2 * i] * v[2 * i]) + (uint32_t)((int32_t)v[2 * i + 1] * v[2 * i + 1]);
    }
    for (int i = 0; i < width; ++i) {
      const uint32_t longer = half[0][i] > half[1][i] ? half[0][i] : half[1][i];
      const uint32_t both = (half[0][i] + 1) / 2 + (half[1][i] + 1) / 2;
      two = longer > two ? longer : two;
      four = both > four ? both : four;
    }
  }
  bounds[0] = two;
  bounds[1] = 2 * (uint64_t)four;
}

int dfp_pack_panels(const dfp_isa_config* cfg, const int16_t* src, size_t rows, size_t k, size_t kc,
                    size_t row_stride, size_t col_stride, size_t row0, int width, size_t panels,
                    int16_t* dst, size_t panel_stride, uint64_t* bounds, size_t bounds_stride) {
  const size_t kpairs = (k + 1) / 2, end = row0 + panels * (size_t)width < rows ? row0 + panels * (size_t)width : rows;
  const size_t valid = end > row0 ? end - row0 : 0;
  src += row0 * row_stride;
  /* The copies write every word of a full panel; an edge panel's padding stays zero. */
  for (size_t q = 0; q < panels; ++q)
    if ((q + 1) * (size_t)width > valid || k % 2)
      memset(dst + q * panel_stride, 0, kpairs * (size_t)width * 2 * sizeof(int16_t));
  int status = 0;
  for (size_t c0 = 0; c0 < k; c0 += 2 * kc, bounds += DFP_CHUNK_LEVELS) {
    const size_t c1 = c0 + 2 * kc < k ? c0 + 2 * kc : k;
    int16_t* block = dst + (c0 / 2) * (size_t)width * 2;
    dfp_pack_block(cfg, src, c0, c1, row_stride, col_stride, valid, width, block, panel_stride);
    for (size_t q = 0; q < panels; ++q)
      status |= dfp_block_bounds(cfg, block + q * panel_stride, (c1 - c0 + 1) / 2, width, bounds + q * bounds_stride);
  }
  return status;
}

int dfp_pack_panel(const dfp_isa_config* cfg, const int16_t* src, size_t rows, size_t k, size_t kc,
                   size_t row_stride, size_t col_stride, size_t row0, int width, int16_t* dst,
                   uint64_t* bounds) {
  return dfp_pack_panels(cfg, src, rows, k, kc, row_stride, col_stride, row0, width, 1, dst, 0, bounds, 0);
}
