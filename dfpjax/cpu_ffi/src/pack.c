#include "pack.h"

#include <string.h>

#include "dfp_kernel.h"

enum { BLOCKS_PER_KC = DFP_KC_PAIRS / DFP_NORM_BLOCK_PAIRS };

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

/* Level-0 bounds of a packed K block: for each norm block of DFP_NORM_BLOCK_PAIRS pairs,
 * the largest squared row norm over the panel's lanes. Returns 1 if an element is -32768. */
static int level0_portable(const int16_t* block, size_t kpairs, int width, uint64_t* chunk) {
  int low = 0;
  for (size_t p0 = 0, blk = 0; p0 < kpairs; p0 += DFP_NORM_BLOCK_PAIRS, ++blk) {
    const size_t p1 = p0 + DFP_NORM_BLOCK_PAIRS < kpairs ? p0 + DFP_NORM_BLOCK_PAIRS : kpairs;
    uint64_t best = 0;
    for (int i = 0; i < width; ++i) {
      uint64_t sq = 0;
      for (size_t p = p0; p < p1; ++p) {
        const int16_t* v = block + (p * (size_t)width + (size_t)i) * 2;
        low |= v[0] == INT16_MIN || v[1] == INT16_MIN;
        sq += (uint32_t)((int32_t)v[0] * v[0] + (int32_t)v[1] * v[1]); /* a pair stays below 2**31 */
      }
      best = sq > best ? sq : best;
    }
    chunk[blk] = best;
  }
  return low;
}

#if defined(DFPJAX_X86)
#include <immintrin.h>

/* The same with vpmaddwd squaring a pair per 32-bit lane, eight lanes at a time. */
__attribute__((target("avx2"))) static int level0_avx2(const int16_t* block, size_t kpairs,
                                                       int width, uint64_t* chunk) {
  __m256i low = _mm256_setzero_si256();
  const __m256i min16 = _mm256_set1_epi16(INT16_MIN);
  for (size_t p0 = 0, blk = 0; p0 < kpairs; p0 += DFP_NORM_BLOCK_PAIRS, ++blk) {
    const size_t p1 = p0 + DFP_NORM_BLOCK_PAIRS < kpairs ? p0 + DFP_NORM_BLOCK_PAIRS : kpairs;
    __m256i best = _mm256_setzero_si256();
    for (int g = 0; g < width; g += 8) {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width - g),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      for (size_t p = p0; p < p1; ++p) {
        const __m256i v = _mm256_maskload_epi32((const int*)(block + (p * (size_t)width + (size_t)g) * 2), mask);
        low = _mm256_or_si256(low, _mm256_cmpeq_epi16(v, min16));
        const __m256i sq = _mm256_madd_epi16(v, v);
        lo = _mm256_add_epi64(lo, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(sq)));
        hi = _mm256_add_epi64(hi, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sq, 1)));
      }
      /* Sums stay below 2**35: signed 64-bit compares order them. */
      best = _mm256_blendv_epi8(best, lo, _mm256_cmpgt_epi64(lo, best));
      best = _mm256_blendv_epi8(best, hi, _mm256_cmpgt_epi64(hi, best));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i*)lanes, best);
    uint64_t m = lanes[0];
    for (int i = 1; i < 4; ++i) m = lanes[i] > m ? lanes[i] : m;
    chunk[blk] = m;
  }
  return !_mm256_testz_si256(low, low);
}
#endif


int dfp_block_bounds(const int16_t* block, size_t kpairs, int width, uint64_t* bounds, int avx2) {
  /* Level 0: the panel's largest row norm per norm block; level l + 1 sums pairs of
   * level-l chunks. Each level's bound is its largest chunk. */
  uint64_t chunk[BLOCKS_PER_KC];
  int low;
#if defined(DFPJAX_X86)
  low = avx2 ? level0_avx2(block, kpairs, width, chunk) : level0_portable(block, kpairs, width, chunk);
#else
  (void)avx2;
  low = level0_portable(block, kpairs, width, chunk);
#endif
  size_t count = (kpairs + DFP_NORM_BLOCK_PAIRS - 1) / DFP_NORM_BLOCK_PAIRS;
  for (int level = 0; level < DFP_CHUNK_LEVELS; ++level) {
    uint64_t m = 0;
    for (size_t b = 0; b < count; ++b) m = chunk[b] > m ? chunk[b] : m;
    bounds[level] = m;
    for (size_t b = 0; b < count / 2; ++b) chunk[b] = chunk[2 * b] + chunk[2 * b + 1];
    if (count & 1) chunk[count / 2] = chunk[count - 1];
    count = (count + 1) / 2;
  }
  return low ? -1 : 0;
}

/* Packing is a fifth of the GEMM's time: build it for AVX2 as well as the baseline. */
#if defined(DFPJAX_X86)
__attribute__((target_clones("avx2", "default")))
#endif
int dfp_pack_panel(const int16_t* src, size_t rows, size_t k, size_t row_stride, size_t col_stride,
                   size_t row0, int width, int16_t* dst, uint64_t* bounds, int avx2) {
  const size_t kpairs = (k + 1) / 2;
  const size_t valid = rows - row0 < (size_t)width ? rows - row0 : (size_t)width;
  src += row0 * row_stride;
  memset(dst, 0, kpairs * (size_t)width * 2 * sizeof(int16_t));
  int status = 0;
  for (size_t c0 = 0; c0 < k; c0 += 2 * DFP_KC_PAIRS, bounds += DFP_CHUNK_LEVELS) {
    const size_t c1 = c0 + 2 * DFP_KC_PAIRS < k ? c0 + 2 * DFP_KC_PAIRS : k;
    int16_t* block = dst + (c0 / 2) * (size_t)width * 2;
    copy_block(src, c0, c1, row_stride, col_stride, valid, width, block);
    status |= dfp_block_bounds(block, (c1 - c0 + 1) / 2, width, bounds, avx2);
  }
  return status;
}
