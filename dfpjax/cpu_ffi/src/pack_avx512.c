/* The avx512_vnni path's copies (pack.h). The column copy (pack_columns): two k-rows' lanes
 * interleaved into pairs 32 lanes at a time, where pack_avx2.c takes 16. The B panels of the
 * 8 x 32 kernel (weight gradients' dy, 32 lanes a panel) and the taps view's A panels (8 lanes
 * a panel, two pairs at a time where the k-rows lie close) are this path's widths; any other
 * goes to the AVX2 copy. The row copy (pack_rows): the 8-lane A panels of rows contiguous in k,
 * sixteen pairs at a time, or all of a part's pairs from two loads where the rows lie close;
 * any other to the AVX2 copy. The norm bounds of panels 16 or 32 lanes wide (the B panels);
 * others' are the AVX2 bounds. */
#include <immintrin.h>

#include "pack.h"

/* Word 2i of a result is x's lane i, word 2i + 1 y's (index 32 + i picks y in vpermt2w):
 * lanes 0-15 of the two rows (PAIRS_LOW), or lanes 16-31 (PAIRS_HIGH). */
#define PAIR_INDEX(i0) \
  _mm512_set_epi16(32 + (i0) + 15, (i0) + 15, 32 + (i0) + 14, (i0) + 14, 32 + (i0) + 13, (i0) + 13, 32 + (i0) + 12, \
                   (i0) + 12, 32 + (i0) + 11, (i0) + 11, 32 + (i0) + 10, (i0) + 10, 32 + (i0) + 9, (i0) + 9,        \
                   32 + (i0) + 8, (i0) + 8, 32 + (i0) + 7, (i0) + 7, 32 + (i0) + 6, (i0) + 6, 32 + (i0) + 5,       \
                   (i0) + 5, 32 + (i0) + 4, (i0) + 4, 32 + (i0) + 3, (i0) + 3, 32 + (i0) + 2, (i0) + 2,              \
                   32 + (i0) + 1, (i0) + 1, 32 + (i0), (i0))

/* The words of the first `lanes` (at most 16) pairs of v. */
static inline __mmask32 pair_words(size_t lanes) {
  return lanes >= 16 ? 0xffffffffu : (__mmask32)((1u << (2 * lanes)) - 1);
}

/* Pairs of lanes [l, l + 16) (v, its first `lanes` valid) into their panels of `width` lanes:
 * one panel's 16 pairs (width 16), or two 8-lane panels' halves (width 8), by masked stores
 * (no AVX512VL needed: a 512-bit store whose mask covers the words); with width 32 the caller
 * places v in its panel. */
static inline void store_pairs(__m512i v, size_t l, size_t lanes, int width, size_t pair, int16_t* out,
                               size_t panel_stride) {
  if (width == 16) {
    _mm512_mask_storeu_epi16(out + l / 16 * panel_stride + pair * 32, pair_words(lanes), v);
    return;
  }
  for (int h = 0; h < 2 && lanes > 8 * (size_t)h; ++h) {
    const size_t n = lanes - 8 * (size_t)h < 8 ? lanes - 8 * (size_t)h : 8;
    const __m512i half = h ? _mm512_shuffle_i64x2(v, v, 0x0e) : v;
    _mm512_mask_storeu_epi16(out + (l / 8 + (size_t)h) * panel_stride + pair * 16, pair_words(n) & 0xffffu, half);
  }
}

/* All 32 pairs of lanes [l, l + 32), low and high as the copy below makes them, into their
 * panels: 512-bit stores, or for 8-lane panels 256-bit halves, with no lane counts, masks or
 * loop over halves to work out (store_pairs'). With those for every group, copying a K block of
 * 64 lanes held in L2, one thread, Zen 4, took 2.3x as long into 8-lane panels and 1.36x into
 * 32-lane ones; the masked stores themselves cost no more than unmasked ones. */
static inline void store_whole(__m512i low, __m512i high, size_t l, int width, size_t pair, int16_t* out,
                               size_t panel_stride) {
  if (width == 32) {
    int16_t* o = out + l / 32 * panel_stride + pair * 64;
    _mm512_storeu_si512((void*)o, low);
    _mm512_storeu_si512((void*)(o + 32), high);
  } else if (width == 16) {
    int16_t* o = out + l / 16 * panel_stride + pair * 32;
    _mm512_storeu_si512((void*)o, low);
    _mm512_storeu_si512((void*)(o + panel_stride), high);
  } else {
    int16_t* o = out + l / 8 * panel_stride + pair * 16;
    _mm256_storeu_si256((__m256i*)o, _mm512_castsi512_si256(low));
    _mm256_storeu_si256((__m256i*)(o + panel_stride), _mm512_extracti64x4_epi64(low, 1));
    _mm256_storeu_si256((__m256i*)(o + 2 * panel_stride), _mm512_castsi512_si256(high));
    _mm256_storeu_si256((__m256i*)(o + 3 * panel_stride), _mm512_extracti64x4_epi64(high, 1));
  }
}

/* The two close copies' word index patterns, for word 16q + 2i + h of a two-pair result:
 * 2q + h (its pair's half) and i (its lane). */
static inline __m512i half_of_word(void) {
  return _mm512_set_epi16(3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2,
                          1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
}
static inline __m512i lane_of_word(void) {
  return _mm512_set_epi16(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0,
                          7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
}

/* One 8-lane panel's lanes [0, valid) of k-rows so close (3 * col_stride + valid <= 32 words)
 * that two pairs' four k-rows lie in one 32-word load: the stem's window rows (3 channels at
 * stride 2: k-rows 6 words apart, parts of 21 rows cut at the panels' edges), one load, one
 * word permute and one store for two pairs where the copy below takes two loads, two permutes
 * and a store for each. Word 16q + 2i + h of a result is lane i of k-row 2q + h. */
static void close_k_rows(const int16_t* src, size_t pairs, size_t col_stride, size_t valid, int16_t* out) {
  const __m512i index =
      _mm512_add_epi16(_mm512_mullo_epi16(half_of_word(), _mm512_set1_epi16((short)col_stride)), lane_of_word());
  const __mmask32 one = pair_words(valid), two = one | one << 16;
  const __mmask32 span_two = (__mmask32)((1ull << (3 * col_stride + valid)) - 1);
  const __mmask32 span_one = (__mmask32)((1ull << (col_stride + valid)) - 1);
  size_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    const __m512i v = _mm512_maskz_loadu_epi16(span_two, src + 2 * p * col_stride);
    _mm512_mask_storeu_epi16(out + p * 16, two, _mm512_permutexvar_epi16(index, v));
  }
  if (p < pairs) {
    const __m512i v = _mm512_maskz_loadu_epi16(span_one, src + 2 * p * col_stride);
    _mm512_mask_storeu_epi16(out + p * 16, one, _mm512_permutexvar_epi16(index, v));
  }
}

/* Pair by pair, all the panels' lanes of its two k-rows, read in order once
 * (dfp_prefetch_pair_ahead); lanes past `valid` are neither read (masked loads) nor written. */
void dfp_pack_columns_avx512(const int16_t* src, size_t pairs, size_t col_stride, size_t valid, int width,
                             int16_t* out, size_t panel_stride) {
  if (width == 8 && valid <= 8 && 3 * col_stride + valid <= 32) {
    close_k_rows(src, pairs, col_stride, valid, out);
    return;
  }
  if (width != 8 && width != 16 && width != 32) {
    dfp_pack_columns_avx2(src, pairs, col_stride, valid, width, out, panel_stride);
    return;
  }
  const __m512i low_index = PAIR_INDEX(0), high_index = PAIR_INDEX(16);
  for (size_t p = 0; p < pairs; ++p) {
    const int16_t* in0 = src + 2 * p * col_stride;
    const int16_t* in1 = in0 + col_stride;
    dfp_prefetch_pair_ahead(in0, col_stride, valid);
    size_t l = 0;
    for (; l + 32 <= valid; l += 32) {
      const __m512i x = _mm512_loadu_si512((const void*)(in0 + l)), y = _mm512_loadu_si512((const void*)(in1 + l));
      store_whole(_mm512_permutex2var_epi16(x, low_index, y), _mm512_permutex2var_epi16(x, high_index, y), l, width,
                  p, out, panel_stride);
    }
    if (l < valid) {
      const size_t lanes = valid - l;
      const __mmask32 mask = (__mmask32)((1u << lanes) - 1);
      const __m512i x = _mm512_maskz_loadu_epi16(mask, in0 + l), y = _mm512_maskz_loadu_epi16(mask, in1 + l);
      const __m512i low = _mm512_permutex2var_epi16(x, low_index, y);
      const __m512i high = _mm512_permutex2var_epi16(x, high_index, y);
      if (width == 32) {
        int16_t* o = out + l / 32 * panel_stride + p * 64;
        _mm512_mask_storeu_epi16(o, pair_words(lanes), low);
        if (lanes > 16) _mm512_mask_storeu_epi16(o + 32, pair_words(lanes - 16), high);
      } else {
        store_pairs(low, l, lanes, width, p, out, panel_stride);
        if (lanes > 16) store_pairs(high, l + 16, lanes - 16, width, p, out, panel_stride);
      }
    }
  }
}

/* Rows of an 8-lane panel so close that all their pairs lie within 64 words ((valid - 1) *
 * row_stride + 2 * pairs): the stem's window rows in the forward pass' pixels view (8 pixels 6
 * words apart, parts of 21 elements: 10 pairs in 62 words), two loads for the part and one
 * two-source word permute and one store for each two pairs, where the AVX2 copy transposes
 * them through 8 x 8 blocks. Word 16q + 2i + h of a result is word 2(p + q) + h of row i. */
static void close_rows(const int16_t* src, size_t pairs, size_t row_stride, size_t valid, size_t span,
                       uint32_t* out) {
  __m512i index =
      _mm512_add_epi16(_mm512_mullo_epi16(lane_of_word(), _mm512_set1_epi16((short)row_stride)), half_of_word());
  const __m512i low = _mm512_maskz_loadu_epi16((__mmask32)((1ull << (span < 32 ? span : 32)) - 1), src);
  const __m512i high = _mm512_maskz_loadu_epi16((__mmask32)((1ull << (span > 32 ? span - 32 : 0)) - 1), src + 32);
  const __mmask16 one = (__mmask16)((1u << valid) - 1), two = (__mmask16)(one | one << 8);
  size_t p = 0;
  for (; p + 2 <= pairs; p += 2, index = _mm512_add_epi16(index, _mm512_set1_epi16(4)))
    _mm512_mask_storeu_epi32(out + p * 8, two, _mm512_permutex2var_epi16(low, index, high));
  if (p < pairs) _mm512_mask_storeu_epi32(out + p * 8, one, _mm512_permutex2var_epi16(low, index, high));
}

/* Sixteen pairs of eight rows contiguous in k, an 8-lane panel's, as an 8 x 16 transpose of
 * 32-bit words: two shuffles a pair where the AVX2 copy's 8 x 8 blocks take three, and half its
 * loads and stores. The next panel's rows are prefetched as the AVX2 copy does, and those four
 * panels on into L2 (a 1x1 layer's pixels read from DRAM, as the column copies': Zen 4, the
 * 56x56 1x1 layers' forward and backward-data kernels up to 6% shorter; 2 or 8 panels on no
 * better). */
static inline void eight_rows_sixteen_pairs(const int16_t* src, size_t row_stride, uint32_t* out) {
  __m512i r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) {
    _mm_prefetch((const char*)((uintptr_t)src + (size_t)(8 + i) * row_stride * sizeof(int16_t)), _MM_HINT_T0);
    _mm_prefetch((const char*)((uintptr_t)src + (size_t)(32 + i) * row_stride * sizeof(int16_t)), _MM_HINT_T1);
    r[i] = _mm512_loadu_si512((const void*)(src + i * row_stride));
  }
  /* t: row pairs (0,1), (2,3), (4,5), (6,7) interleaved; u[k], u[4 + k]: rows 0-3 and 4-7 of
   * pair 4L + k in 128-bit lane L. */
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  /* low[k], high[k]: both halves of pair 4L + k for L = 0, 1 and L = 2, 3; then pairs 4L + k
   * and 4L + k + 1 (k = 0, 2) into one vector. */
  __m512i low[4], high[4];
  for (int k = 0; k < 4; ++k) {
    low[k] = _mm512_shuffle_i64x2(u[k], u[4 + k], _MM_SHUFFLE(1, 0, 1, 0));
    high[k] = _mm512_shuffle_i64x2(u[k], u[4 + k], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; k += 2) {
    _mm512_storeu_si512((void*)(out + k * 8), _mm512_shuffle_i64x2(low[k], low[k + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512((void*)(out + (4 + k) * 8), _mm512_shuffle_i64x2(low[k], low[k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_si512((void*)(out + (8 + k) * 8), _mm512_shuffle_i64x2(high[k], high[k + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512((void*)(out + (12 + k) * 8), _mm512_shuffle_i64x2(high[k], high[k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

/* Whole 8-lane panels of 16 pairs or more by sixteen pairs, the last group ending at the last
 * pair (those it repeats rewritten alike); rows that lie close by permutes; others by the AVX2
 * copy. */
void dfp_pack_rows_avx512(const int16_t* src, size_t pairs, size_t row_stride, size_t valid, int width,
                          uint32_t* out) {
  const size_t span = valid > 0 ? (valid - 1) * row_stride + 2 * pairs : 0;
  if (width == 8 && valid > 0 && valid <= 8 && span <= 64) {
    close_rows(src, pairs, row_stride, valid, span, out);
    return;
  }
  if (width == 8 && valid == 8 && pairs >= 16) {
    for (size_t p = 0; p < pairs; p += 16) {
      const size_t at = p + 16 <= pairs ? p : pairs - 16;
      eight_rows_sixteen_pairs(src + 2 * at, row_stride, out + at * 8);
    }
    return;
  }
  dfp_pack_rows_avx2(src, pairs, row_stride, valid, width, out);
}

/* The norm bounds (pack.h) of this path's B panels, and of any whose width is a multiple of 16:
 * pack_avx2.c's row sums at twice the width, 16 lanes a vector, each pair's squares by
 * vpmaddwd and the next pair's added by vpdpwssd (a two-pair term, below 2**32, floored into
 * units of 256 as there). Other widths (the 8-lane A panels, whose two pairs a vector made
 * these sums no faster) go to the AVX2 bounds. */

/* The row sums of pairs [0, n) (n <= DFP_NORM_BLOCK_PAIRS) of the 16 lanes at `at`, pairs
 * `stride` words apart; least lowered by their words. */
static inline __m512i norm_block_sums(const int16_t* at, size_t stride, size_t n, __m512i* least) {
  __m512i sum = _mm512_setzero_si512();
  size_t p = 0;
  for (; p + 2 <= n; p += 2) {
    const __m512i v = _mm512_loadu_si512((const void*)(at + p * stride));
    const __m512i w = _mm512_loadu_si512((const void*)(at + (p + 1) * stride));
    *least = _mm512_min_epi16(*least, _mm512_min_epi16(v, w));
    sum = _mm512_add_epi32(sum, _mm512_srli_epi32(_mm512_dpwssd_epi32(_mm512_madd_epi16(v, v), w, w), 8));
  }
  if (p < n) {
    const __m512i v = _mm512_loadu_si512((const void*)(at + p * stride));
    *least = _mm512_min_epi16(*least, v);
    sum = _mm512_add_epi32(sum, _mm512_srli_epi32(_mm512_madd_epi16(v, v), 8));
  }
  return sum;
}

DFP_DEFINE_FOLD_LEVELS(fold_levels, __m512i, _mm512_max_epu32, _mm512_add_epi32)

int dfp_norm_bounds_avx512(const int16_t* block, size_t kpairs, int width, uint64_t* bounds) {
  if (width % 16 != 0) return dfp_norm_bounds_avx2(block, kpairs, width, bounds);
  enum { BLOCKS = DFP_KC_PAIRS / DFP_NORM_BLOCK_PAIRS };
  __m512i least = _mm512_set1_epi16(INT16_MAX), top[DFP_NORM_LEVELS], chunk[BLOCKS];
  for (int level = 0; level < DFP_NORM_LEVELS; ++level) top[level] = _mm512_setzero_si512();
  const size_t stride = 2 * (size_t)width;
  for (int g = 0; g < width; g += 16) {
    size_t count = 0;
    for (size_t p0 = 0; p0 < kpairs; p0 += DFP_NORM_BLOCK_PAIRS, ++count) {
      const size_t n = kpairs - p0 < DFP_NORM_BLOCK_PAIRS ? kpairs - p0 : DFP_NORM_BLOCK_PAIRS;
      chunk[count] = norm_block_sums(block + p0 * stride + 2 * (size_t)g, stride, n, &least);
    }
    fold_levels(chunk, count, top);
  }
  for (int level = 0; level < DFP_NORM_LEVELS; ++level) {
    const size_t pairs = (size_t)DFP_NORM_BLOCK_PAIRS << level;
    bounds[level] = 256 * ((uint64_t)_mm512_reduce_max_epu32(top[level]) + (pairs < kpairs ? pairs : kpairs));
  }
  return _mm512_cmpeq_epi16_mask(least, _mm512_set1_epi16(INT16_MIN)) != 0;
}
