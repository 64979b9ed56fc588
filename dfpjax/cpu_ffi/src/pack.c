#include "pack.h"

#include <string.h>

#include "dfp_kernel.h"

enum { BLOCKS_PER_KC = DFP_KC_PAIRS / DFP_NORM_BLOCK_PAIRS };

#if defined(DFPJAX_X86)
#include <immintrin.h>

/* Rows contiguous in k, six rows (the panels of the 6 x 16 kernels): eight pairs at a time
 * as a 6 x 8 transpose of 32-bit words. Returns the pairs done, a multiple of eight. */
__attribute__((target("avx2"))) static size_t copy_six_rows_avx2(const int16_t* src, size_t pairs,
                                                                 size_t row_stride, uint32_t* out) {
  size_t p = 0;
  for (; p + 8 <= pairs; p += 8, src += 16, out += 48) {
    __m256i r[6];
    for (int i = 0; i < 6; ++i) r[i] = _mm256_loadu_si256((const __m256i*)(src + i * row_stride));
    /* t: rows (0,1), (2,3), (4,5) interleaved; u: rows 0-3 of pairs (0|4), (1|5), (2|6), (3|7). */
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i u[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                          _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
    const __m128i rows45[4] = {_mm256_castsi256_si128(t4), _mm256_castsi256_si128(t5),
                               _mm256_extracti128_si256(t4, 1), _mm256_extracti128_si256(t5, 1)};
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < 4; ++j) {
        uint32_t* o = out + (half * 4 + j) * 6;
        const __m128i r03 = half ? _mm256_extracti128_si256(u[j], 1) : _mm256_castsi256_si128(u[j]);
        const __m128d r45 = _mm_castsi128_pd(rows45[half * 2 + j / 2]);
        _mm_storeu_si128((__m128i*)o, r03);
        if (j % 2) _mm_storeh_pd((double*)(o + 4), r45);
        else _mm_storel_pd((double*)(o + 4), r45);
      }
  }
  return p;
}

/* Rows contiguous at fixed k: sixteen rows of two k-rows interleaved into pairs. */
__attribute__((target("avx2"))) static void interleave16_avx2(const int16_t* in0, const int16_t* in1,
                                                              int16_t* o) {
  const __m256i x = _mm256_loadu_si256((const __m256i*)in0), y = _mm256_loadu_si256((const __m256i*)in1);
  const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
  _mm256_storeu_si256((__m256i*)o, _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_storeu_si256((__m256i*)(o + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
}
#endif

/* Copies columns [c0, c1) of the panel's valid rows (c0 even) into dst[pair][width][2];
 * leaves the other words of dst as they are. avx2 selects the AVX2 copies. */
static void copy_block(const int16_t* src, size_t c0, size_t c1, size_t row_stride,
                       size_t col_stride, size_t valid, int width, int16_t* dst, int avx2) {
  const size_t pairs = (c1 - c0) / 2;
  if (col_stride == 1) {
    /* Rows contiguous in k: each row's pairs are consecutive 32-bit words. */
    uint32_t* out = (uint32_t*)dst;
    size_t done = 0;
#if defined(DFPJAX_X86)
    if (avx2 && width == 6 && valid == 6) done = copy_six_rows_avx2(src + c0, pairs, row_stride, out);
#endif
    for (size_t i = 0; i < valid; ++i) {
      const int16_t* row = src + i * row_stride + c0;
      for (size_t p = done; p < pairs; ++p) {
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
      size_t i = 0;
#if defined(DFPJAX_X86)
      if (avx2)
        for (; i + 16 <= valid; i += 16) interleave16_avx2(in0 + i, in1 + i, o + 2 * i);
#endif
      for (; i < valid; ++i) {
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
#if !defined(DFPJAX_X86)
  (void)avx2;
#endif
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
/* The same with vpmaddwd squaring a pair per 32-bit lane, eight lanes at a time. A pair's
 * square s < 2**31 enters the sum as floor(s / 8), so that eight of them fit 32 bits; the
 * block's bound 8 * sum + 7 * pairs is then at least the exact sum and at most 56 above. */
__attribute__((target("avx2"))) static int level0_avx2(const int16_t* block, size_t kpairs,
                                                       int width, uint64_t* chunk) {
  __m256i least = _mm256_set1_epi16(INT16_MAX);
  for (size_t p0 = 0, blk = 0; p0 < kpairs; p0 += DFP_NORM_BLOCK_PAIRS, ++blk) {
    const size_t p1 = p0 + DFP_NORM_BLOCK_PAIRS < kpairs ? p0 + DFP_NORM_BLOCK_PAIRS : kpairs;
    __m256i best = _mm256_setzero_si256();
    for (int g = 0; g < width; g += 8) {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width - g),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const int whole = width - g >= 8;
      __m256i sum = _mm256_setzero_si256();
      for (size_t p = p0; p < p1; ++p) {
        const int16_t* at = block + (p * (size_t)width + (size_t)g) * 2;
        const __m256i v = whole ? _mm256_loadu_si256((const __m256i*)at)
                                : _mm256_maskload_epi32((const int*)at, mask);
        least = _mm256_min_epi16(least, v);
        sum = _mm256_add_epi32(sum, _mm256_srli_epi32(_mm256_madd_epi16(v, v), 3));
      }
      best = _mm256_max_epu32(best, sum);
    }
    best = _mm256_max_epu32(best, _mm256_permute2x128_si256(best, best, 1));
    best = _mm256_max_epu32(best, _mm256_shuffle_epi32(best, _MM_SHUFFLE(1, 0, 3, 2)));
    best = _mm256_max_epu32(best, _mm256_shuffle_epi32(best, _MM_SHUFFLE(2, 3, 0, 1)));
    chunk[blk] = 8 * (uint64_t)(uint32_t)_mm256_cvtsi256_si32(best) + 7 * (p1 - p0);
  }
  const __m256i low = _mm256_cmpeq_epi16(least, _mm256_set1_epi16(INT16_MIN));
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

int dfp_pack_panel(const int16_t* src, size_t rows, size_t k, size_t row_stride, size_t col_stride,
                   size_t row0, int width, int16_t* dst, uint64_t* bounds, int avx2) {
  const size_t kpairs = (k + 1) / 2;
  const size_t valid = rows - row0 < (size_t)width ? rows - row0 : (size_t)width;
  src += row0 * row_stride;
  /* The copies write every word of a full panel; an edge panel's padding stays zero. */
  if (valid < (size_t)width || k % 2) memset(dst, 0, kpairs * (size_t)width * 2 * sizeof(int16_t));
  int status = 0;
  for (size_t c0 = 0; c0 < k; c0 += 2 * DFP_KC_PAIRS, bounds += DFP_CHUNK_LEVELS) {
    const size_t c1 = c0 + 2 * DFP_KC_PAIRS < k ? c0 + 2 * DFP_KC_PAIRS : k;
    int16_t* block = dst + (c0 / 2) * (size_t)width * 2;
    copy_block(src, c0, c1, row_stride, col_stride, valid, width, block, avx2);
    status |= dfp_block_bounds(block, (c1 - c0 + 1) / 2, width, bounds, avx2);
  }
  return status;
}
