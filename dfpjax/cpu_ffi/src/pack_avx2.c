/* The AVX2 entries of packing (pack.h): the panel copies, the norm bounds and the fine bounds. */
#include <immintrin.h>

#include "pack.h"

/* The same columns of the next `rows` rows, the next panel's when the caller packs panel after
 * panel down a matrix (a 1x1 layer's pixels, 512 bytes each at 256 channels): each row is
 * only a few cache lines, too short a stream for the hardware prefetcher, and the copies
 * waited on every load (forward of conv2_1x1_reduce and backward-data of conv2_1x1_expand,
 * K = 256: -7% per kernel call on Zen 3). Addresses as integers: prefetches past the source
 * are harmless, they never fault. */
static inline void prefetch_next_rows(const int16_t* src, int rows, size_t row_stride) {
  for (int i = 0; i < rows; ++i)
    _mm_prefetch((const char*)((uintptr_t)src + (size_t)(rows + i) * row_stride * sizeof(int16_t)), _MM_HINT_T0);
}

/* Eight pairs of six rows contiguous in k (the panels of the 6 x 16 kernels) as a 6 x 8
 * transpose of 32-bit words. */
static inline __attribute__((always_inline)) void six_rows_group(const int16_t* src, size_t row_stride, uint32_t* out) {
  __m256i r[6];
  prefetch_next_rows(src, 6, row_stride);
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

/* Eight pairs of eight rows contiguous in k (the panels of the 8 x 32 kernel, or eight lanes of
 * a wider panel: a B panel read from transposed weights) as an 8 x 8 transpose of 32-bit words,
 * into out[pair * width + lane]. */
static inline __attribute__((always_inline)) void eight_rows_group(const int16_t* src, size_t row_stride, uint32_t* out,
                                                                    size_t width) {
  __m256i r[8], t[8], u[8];
  prefetch_next_rows(src, 8, row_stride);
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256((const __m256i*)(src + i * row_stride));
  /* t: row pairs (0,1), (2,3), (4,5), (6,7) interleaved; u[j], u[4 + j]: rows 0-3 and 4-7 of
   * pairs (j | j + 4) in the two 128-bit lanes. */
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_si256((__m256i*)(out + width * j), _mm256_permute2x128_si256(u[j], u[4 + j], 0x20));
    _mm256_storeu_si256((__m256i*)(out + width * (j + 4)), _mm256_permute2x128_si256(u[j], u[4 + j], 0x31));
  }
}

/* The first pair of the row copy's group of eight from pair p on, of pairs >= 8: p, or where
 * fewer than eight are left, the eight that end at the last pair, those already done rewritten
 * alike (the stem's rows of 21 leave 10 pairs a part, whose last two, word by word, took a fifth
 * of its packing). */
static inline size_t group_start(size_t p, size_t pairs) { return p + 8 <= pairs ? p : pairs - 8; }

/* The row copies: every pair where there are eight or more (returns pairs), else none (0). */
static size_t copy_six_rows(const int16_t* src, size_t pairs, size_t row_stride, uint32_t* out) {
  if (pairs < 8) return 0;
  for (size_t p = 0; p < pairs; p += 8) {
    const size_t at = group_start(p, pairs);
    six_rows_group(src + 2 * at, row_stride, out + at * 6);
  }
  return pairs;
}

static size_t copy_eight_rows(const int16_t* src, size_t pairs, size_t row_stride, uint32_t* out, size_t width) {
  if (pairs < 8) return 0;
  for (size_t p = 0; p < pairs; p += 8) {
    const size_t at = group_start(p, pairs);
    eight_rows_group(src + 2 * at, row_stride, out + at * width, width);
  }
  return pairs;
}

void dfp_pack_rows_avx2(const int16_t* src, size_t pairs, size_t row_stride, size_t valid, int width,
                        uint32_t* out) {
  if (width == 6 && valid == 6) {
    dfp_pack_rows_from(src, copy_six_rows(src, pairs, row_stride, out), pairs, row_stride, valid, width, out);
    return;
  }
  /* Whole groups of eight lanes by the transpose (the stem's window rows on the avx512_vnni
   * path's 8-row panels too), then the pairs it leaves of short rows and every pair of the
   * lanes past the last group. */
  size_t lanes = 0, done = 0;
  if (width % 8 == 0)
    for (; lanes + 8 <= valid; lanes += 8)
      done = copy_eight_rows(src + lanes * row_stride, pairs, row_stride, out + lanes, (size_t)width);
  dfp_pack_rows_from(src, done, pairs, row_stride, lanes, width, out);
  dfp_pack_rows_from(src + lanes * row_stride, 0, pairs, row_stride, valid - lanes, width, out + lanes);
}

/* Rows contiguous at fixed k: sixteen (then eight, four) lanes of two k-rows interleaved into pairs. */
static inline void interleave16(const int16_t* in0, const int16_t* in1, int16_t* o) {
  const __m256i x = _mm256_loadu_si256((const __m256i*)in0), y = _mm256_loadu_si256((const __m256i*)in1);
  const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
  _mm256_storeu_si256((__m256i*)o, _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_storeu_si256((__m256i*)(o + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
}

static inline void interleave8(const int16_t* in0, const int16_t* in1, int16_t* o) {
  const __m128i x = _mm_loadu_si128((const __m128i*)in0), y = _mm_loadu_si128((const __m128i*)in1);
  _mm_storeu_si128((__m128i*)o, _mm_unpacklo_epi16(x, y));
  _mm_storeu_si128((__m128i*)(o + 8), _mm_unpackhi_epi16(x, y));
}

/* Sixteen, then eight pairs at a time; a tail under eight as the eight pairs that end at
 * element n, rewriting some of the previous ones with the same values (a stem's window row of
 * 21: 16 + 8), so that nothing past element n is read. */
void dfp_interleave_pairs_avx2(const int16_t* in0, const int16_t* in1, size_t n, int16_t* out) {
  if (n < 8) {
    dfp_interleave_pairs_portable(in0, in1, n, out);
    return;
  }
  size_t i = 0;
  for (; i + 16 <= n; i += 16) interleave16(in0 + i, in1 + i, out + 2 * i);
  if (i + 8 <= n) interleave8(in0 + i, in1 + i, out + 2 * i), i += 8;
  if (i < n) interleave8(in0 + n - 8, in1 + n - 8, out + 2 * (n - 8));
}

/* Lanes [0, valid) (at most one panel's) of k-rows in0 and in1 interleaved into o. wide: the
 * 8 lanes from in0 + valid - 6 and in1 + valid - 6 lie inside the source, so the 6-lane
 * panels of the 256-bit kernels are filled from two 8-lane loads whose two extra lanes are
 * read, never stored. */
static inline void interleave_lanes(const int16_t* in0, const int16_t* in1, size_t valid, int wide, int16_t* o) {
  size_t i = 0;
  for (; i + 16 <= valid; i += 16) interleave16(in0 + i, in1 + i, o + 2 * i);
  if (i + 8 <= valid) interleave8(in0 + i, in1 + i, o + 2 * i), i += 8;
  if (i + 4 < valid && wide) {
    const __m128i x = _mm_loadu_si128((const __m128i*)(in0 + i)), y = _mm_loadu_si128((const __m128i*)(in1 + i));
    _mm_storeu_si128((__m128i*)(o + 2 * i), _mm_unpacklo_epi16(x, y));
    i += 4;
    if (i + 2 <= valid) {
      _mm_storel_epi64((__m128i*)(o + 2 * i), _mm_unpackhi_epi16(x, y));
      i += 2;
    }
  } else if (i + 4 <= valid) { /* four lanes here, the rest below */
    const __m128i x = _mm_loadl_epi64((const __m128i*)(in0 + i)), y = _mm_loadl_epi64((const __m128i*)(in1 + i));
    _mm_storeu_si128((__m128i*)(o + 2 * i), _mm_unpacklo_epi16(x, y));
    i += 4;
  }
  for (; i < valid; ++i) {
    o[2 * i] = in0[i];
    o[2 * i + 1] = in1[i];
  }
}

/* Lanes 0-3 of k-rows in0 and in1 interleaved into o: a 6-lane panel's first four. */
static inline void four_lanes(const int16_t* in0, const int16_t* in1, int16_t* o) {
  _mm_storeu_si128((__m128i*)o, _mm_unpacklo_epi16(_mm_loadl_epi64((const __m128i*)in0),
                                                   _mm_loadl_epi64((const __m128i*)in1)));
}

/* Lanes 0-7 of k-rows in0 and in1 interleaved: lanes 0-5 into the 6-lane panel at o, 6 and 7
 * into the first two lanes of the next, at o + panel_stride. */
static inline void eight_lanes(const int16_t* in0, const int16_t* in1, int16_t* o, size_t panel_stride) {
  const __m128i x = _mm_loadu_si128((const __m128i*)in0), y = _mm_loadu_si128((const __m128i*)in1);
  const __m128i lanes47 = _mm_unpackhi_epi16(x, y);
  _mm_storeu_si128((__m128i*)o, _mm_unpacklo_epi16(x, y));
  _mm_storel_epi64((__m128i*)(o + 8), lanes47);
  _mm_storeh_pd((double*)(o + panel_stride), _mm_castsi128_pd(lanes47));
}

/* Lanes 0-11 of k-rows in0 and in1 interleaved into two 6-lane panels, o and o + panel_stride:
 * lanes 0-3, 4-7 and 8-11 as three 4-lane interleaves, the middle one split between the panels
 * (one panel at a time by interleave_lanes takes half again the instructions). */
static inline void six_lane_panels(const int16_t* in0, const int16_t* in1, int16_t* o, size_t panel_stride) {
  eight_lanes(in0, in1, o, panel_stride);
  four_lanes(in0 + 8, in1 + 8, o + panel_stride + 4);
}

/* Whole panels in loops of their own, with nothing but the copies and the prefetch: 16-lane
 * panels (the 6 x 16 kernels' B panels: dy in backward-weights) one interleave16 each, 6-lane
 * ones (their A panels: x in backward-weights) two at a time. In one loop with the partial
 * panels' cases GCC kept the loop's values on the stack: a K block of 16-lane panels from a
 * source in L2 took 3 times as long (190-210 against 59-69 ps a word, one thread, Zen 3), of
 * 6-lane ones 12-34% longer. In the kernels dy comes from memory, so less shows there: one
 * thread's backward-weights of conv2's and conv4's 1x1 expansions 2-4% shorter, the rest
 * within the noise (docs/performance.md). */
static void whole_panels16(const int16_t* src, size_t pairs, size_t col_stride, size_t panels, int16_t* out,
                           size_t panel_stride) {
  for (size_t p = 0; p < pairs; ++p, out += 32) {
    const int16_t* in0 = src + 2 * p * col_stride;
    dfp_prefetch_pair_ahead(in0, col_stride, panels * 16);
    for (size_t q = 0; q < panels; ++q)
      interleave16(in0 + 16 * q, in0 + col_stride + 16 * q, out + q * panel_stride);
  }
}

/* tail: 0, or the 4 or 8 lanes past the panel pairs that a power-of-two channel count leaves
 * (64 = 5 * 12 + 4, 128 = 10 * 12 + 8), copied in the same loop: in a second loop of their own
 * each pair's k-rows were read again (a K block from L2, one thread, Zen 3, ps a word: 64 and
 * 128 channels 96-106 -> 65, 256 channels 83-84 -> 73). */
static inline void whole_panels6(const int16_t* src, size_t pairs, size_t col_stride, size_t panel_pairs, int tail,
                                 int16_t* out, size_t panel_stride) {
  const size_t lanes = panel_pairs * 12;
  for (size_t p = 0; p < pairs; ++p, out += 12) {
    const int16_t* in0 = src + 2 * p * col_stride;
    dfp_prefetch_pair_ahead(in0, col_stride, lanes + (size_t)tail);
    for (size_t q = 0; q < panel_pairs; ++q)
      six_lane_panels(in0 + 12 * q, in0 + col_stride + 12 * q, out + 2 * q * panel_stride, panel_stride);
    int16_t* rest = out + 2 * panel_pairs * panel_stride;
    if (tail == 4) four_lanes(in0 + lanes, in0 + col_stride + lanes, rest);
    if (tail == 8) eight_lanes(in0 + lanes, in0 + col_stride + lanes, rest, panel_stride);
  }
}

/* Lanes [0, valid) of any panels' width, panel by panel through interleave_lanes. */
static void any_lanes(const int16_t* src, size_t pairs, size_t col_stride, size_t valid, int width, int16_t* out,
                      size_t panel_stride) {
  for (size_t p = 0; p < pairs; ++p) {
    const int16_t* in0 = src + 2 * p * col_stride;
    const int16_t* in1 = in0 + col_stride;
    /* A wide load reads at most lane valid + 2 of a k-row: for in0 before in1's last valid
     * lane (col_stride >= 8), for in1 before the next pair's: inside the source. */
    const int wide = p + 1 < pairs && col_stride >= 8;
    dfp_prefetch_pair_ahead(in0, col_stride, valid);
    for (size_t l0 = 0, q = 0; l0 < valid; l0 += (size_t)width, ++q)
      interleave_lanes(in0 + l0, in1 + l0, valid - l0 < (size_t)width ? valid - l0 : (size_t)width, wide,
                       out + q * panel_stride + p * (size_t)width * 2);
  }
}

/* The first `words` (2 to 16, even) words of lo, then of hi, at o. */
static inline void store_words(int16_t* o, __m128i lo, __m128i hi, size_t words) {
  switch (words) {
    case 16: _mm_storeu_si128((__m128i*)(o + 8), hi); /* fall through */
    case 8: _mm_storeu_si128((__m128i*)o, lo); break;
    case 14: _mm_storel_epi64((__m128i*)(o + 8), hi); _mm_storeu_si32(o + 12, _mm_unpackhi_epi64(hi, hi));
             _mm_storeu_si128((__m128i*)o, lo); break;
    case 12: _mm_storel_epi64((__m128i*)(o + 8), hi); _mm_storeu_si128((__m128i*)o, lo); break;
    case 10: _mm_storeu_si32(o + 8, hi); _mm_storeu_si128((__m128i*)o, lo); break;
    case 6: _mm_storel_epi64((__m128i*)o, lo); _mm_storeu_si32(o + 4, _mm_unpackhi_epi64(lo, lo)); break;
    case 4: _mm_storel_epi64((__m128i*)o, lo); break;
    default: _mm_storeu_si32(o, lo); break;
  }
}

/* Lanes [0, valid) of one panel, valid <= 8, from 8-lane loads: the stem's window rows cut at
 * its 6-lane panels' edges (rows of 21 elements, 6 apart: pack_taps in im2col.c), 3-6 lanes a
 * call, where interleave_lanes took 4 lanes a vector and the rest one by one. Each pair but the
 * last reads up to lane 7 of its k-rows, at or before a lane the next pair reads (col_stride +
 * valid >= 8); the last goes lane by lane. Inlined with valid a constant: fixed stores. */
static inline __attribute__((always_inline)) void narrow_lanes(const int16_t* src, size_t pairs, size_t col_stride,
                                                                size_t valid, int width, int16_t* out) {
  size_t p = 0;
  if (col_stride + valid >= 8)
    for (; p + 1 < pairs; ++p) {
      const int16_t* in0 = src + 2 * p * col_stride;
      if (col_stride >= 32) dfp_prefetch_pair_ahead(in0, col_stride, valid);
      const __m128i x = _mm_loadu_si128((const __m128i*)in0), y = _mm_loadu_si128((const __m128i*)(in0 + col_stride));
      store_words(out + p * (size_t)width * 2, _mm_unpacklo_epi16(x, y), _mm_unpackhi_epi16(x, y), 2 * valid);
    }
  for (; p < pairs; ++p)
    dfp_interleave_pairs_portable(src + 2 * p * col_stride, src + (2 * p + 1) * col_stride, valid,
                                  out + p * (size_t)width * 2);
}

void dfp_pack_columns_avx2(const int16_t* src, size_t pairs, size_t col_stride, size_t valid, int width,
                           int16_t* out, size_t panel_stride) {
  if (valid <= 8 && valid <= (size_t)width) {
    switch (valid) { /* a loop for each count, its stores fixed */
      case 1: narrow_lanes(src, pairs, col_stride, 1, width, out); break;
      case 2: narrow_lanes(src, pairs, col_stride, 2, width, out); break;
      case 3: narrow_lanes(src, pairs, col_stride, 3, width, out); break;
      case 4: narrow_lanes(src, pairs, col_stride, 4, width, out); break;
      case 5: narrow_lanes(src, pairs, col_stride, 5, width, out); break;
      case 6: narrow_lanes(src, pairs, col_stride, 6, width, out); break;
      case 7: narrow_lanes(src, pairs, col_stride, 7, width, out); break;
      case 8: narrow_lanes(src, pairs, col_stride, 8, width, out); break;
      default: break;
    }
    return;
  }
  size_t done = 0; /* lanes the whole-panel loops copied (with a 6-lane tail of 4 or 8) */
  if (width == 16) {
    done = valid / 16 * 16;
    whole_panels16(src, pairs, col_stride, done / 16, out, panel_stride);
  } else if (width == 6) {
    const size_t tail = valid % 12 == 4 || valid % 12 == 8 ? valid % 12 : 0;
    whole_panels6(src, pairs, col_stride, valid / 12, (int)tail, out, panel_stride);
    done = valid / 12 * 12 + tail;
  }
  if (done < valid)
    any_lanes(src + done, pairs, col_stride, valid - done, width, out + done / (size_t)width * panel_stride,
              panel_stride);
}

/* The row sums of the norm blocks are kept in units of 256 (each term a square, or a sum of two,
 * floored by a shift of 8), so that a row's sum over a whole K block fits 32 bits: a term is
 * below 2**32 / 256, a pair's square below 2**31 / 256, and a row has at most DFP_KC_PAIRS / 2
 * of the first or DFP_KC_PAIRS of the second. A chunk's bound is then 256 * sum + 256 * pairs:
 * at least the exact sum, and at most 256 per pair above it (a row of large values sums about
 * 10**8 a pair). */
_Static_assert(DFP_KC_PAIRS <= 512, "a row's sum in units of 256 over a K block must fit 32 bits");

/* Lanes [g, g + 8) of a panel `width` lanes wide: whole where all eight lie inside it, else
 * mask selects those that do (the bounds never load past a panel, whose last may end the
 * buffer). */
typedef struct {
  __m256i mask;
  int whole;
} lane_group;

static inline lane_group lane_group_of(int width, int g) {
  const lane_group lanes = {_mm256_cmpgt_epi32(_mm256_set1_epi32(width - g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                            width - g >= 8};
  return lanes;
}

/* A pair's words of those lanes at `at`, zero past the panel. */
static inline __m256i load_lanes(const int16_t* at, lane_group lanes) {
  return lanes.whole ? _mm256_loadu_si256((const __m256i*)at) : _mm256_maskload_epi32((const int*)at, lanes.mask);
}

/* The term of two pairs v and w of the same lanes (rows): their squares summed per lane, in
 * units of 256; least lowered by their words (an element of -32768 shows there). */
static inline __m256i two_pair_term(__m256i v, __m256i w, __m256i* least) {
  *least = _mm256_min_epi16(*least, _mm256_min_epi16(v, w));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_madd_epi16(v, v), _mm256_madd_epi16(w, w)), 8);
}

/* A whole norm block of a 6-lane panel (the 6 x 16 kernels' A panels): its 48 words in six
 * vectors, with no masked loads, whose lanes hold rows 0-5, 0, 1 / 2-5, 0-3 / 4, 5, 0-5, then
 * the same again (pairs 4 on), so each lane sums two pairs of one row; each row's terms
 * gathered into lanes 0-5 by permutes, lanes 6 and 7 zero. */
static inline __m256i six_row_sums(const int16_t* at, __m256i* least) {
  __m256i s[3];
  for (int i = 0; i < 3; ++i) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(at + 16 * i));
    const __m256i w = _mm256_loadu_si256((const __m256i*)(at + 16 * (i + 3)));
    s[i] = two_pair_term(v, w, least);
  }
  /* Lanes 0-5: row r of s[0], of s[1] (lane r + 4 mod 6), of s[2] (lane r + 2 mod 6). */
  const __m256i rows = _mm256_add_epi32(
      _mm256_add_epi32(s[0], _mm256_permutevar8x32_epi32(s[1], _mm256_setr_epi32(4, 5, 0, 1, 2, 3, 6, 7))),
      _mm256_permutevar8x32_epi32(s[2], _mm256_setr_epi32(2, 3, 4, 5, 0, 1, 6, 7)));
  /* Lanes 6 and 7 of s[0], s[1], s[2] (rows 0-1, 2-3, 4-5) into lanes 0-1, 2-3, 4-5. */
  const __m256i high = _mm256_setr_epi32(6, 7, 6, 7, 6, 7, 6, 7);
  const __m256i rest = _mm256_blend_epi32(_mm256_blend_epi32(_mm256_permutevar8x32_epi32(s[0], high),
                                                             _mm256_permutevar8x32_epi32(s[1], high), 0x0c),
                                          _mm256_permutevar8x32_epi32(s[2], high), 0x30);
  return _mm256_blend_epi32(_mm256_add_epi32(rows, rest), _mm256_setzero_si256(), 0xc0);
}

/* Pairs [p0, p1) of lanes [g, g + 8) of a panel `width` lanes wide, lanes past it not loaded:
 * each row's squares summed in units of 256, lane by lane; where the lanes are whole, two pairs
 * a term, as six_row_sums sums them (half the shifts and loop steps: a K block of 16-lane panels
 * in L2, one thread, Zen 3, 63 -> 49 ps a word). */
static inline __m256i eight_row_sums(const int16_t* block, size_t p0, size_t p1, int width, int g, __m256i* least) {
  const lane_group lanes = lane_group_of(width, g);
  __m256i sum = _mm256_setzero_si256();
  size_t p = p0;
  if (lanes.whole)
    for (; p + 2 <= p1; p += 2) {
      const int16_t* at = block + (p * (size_t)width + (size_t)g) * 2;
      const __m256i v = _mm256_loadu_si256((const __m256i*)at);
      const __m256i w = _mm256_loadu_si256((const __m256i*)(at + 2 * (size_t)width));
      sum = _mm256_add_epi32(sum, two_pair_term(v, w, least));
    }
  for (; p < p1; ++p) {
    const __m256i v = load_lanes(block + (p * (size_t)width + (size_t)g) * 2, lanes);
    *least = _mm256_min_epi16(*least, v);
    sum = _mm256_add_epi32(sum, _mm256_srli_epi32(_mm256_madd_epi16(v, v), 8));
  }
  return sum;
}

static inline uint32_t max_lane(__m256i v) {
  v = _mm256_max_epu32(v, _mm256_permute2x128_si256(v, v, 1));
  v = _mm256_max_epu32(v, _mm256_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm256_max_epu32(v, _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
  return (uint32_t)_mm256_cvtsi256_si32(v);
}

DFP_DEFINE_FOLD_LEVELS(fold_levels, __m256i, _mm256_max_epu32, _mm256_add_epi32)

/* The levels as dfp_norm_bounds_portable's, lane by lane (a lane is a row): each norm block's
 * row sums, then chunks of two of the level below; each level's largest over chunks and rows
 * taken across lanes once, at the end. Two groups of eight lanes go through each norm block
 * together, so that a 16-lane panel's lines are read once, not once a group (a K block of
 * 16-lane panels from L2, one thread, Zen 3: 49-53 -> 43-46 ps a word). */
int dfp_norm_bounds_avx2(const int16_t* block, size_t kpairs, int width, uint64_t* bounds) {
  enum { BLOCKS = DFP_KC_PAIRS / DFP_NORM_BLOCK_PAIRS };
  __m256i least = _mm256_set1_epi16(INT16_MAX), top[DFP_NORM_LEVELS], chunk[2][BLOCKS];
  for (int level = 0; level < DFP_NORM_LEVELS; ++level) top[level] = _mm256_setzero_si256();
  for (int g = 0; g < width; g += 16) {
    const int two_groups = g + 8 < width;
    size_t count = 0;
    for (size_t p0 = 0; p0 < kpairs; p0 += DFP_NORM_BLOCK_PAIRS, ++count) {
      const size_t p1 = p0 + DFP_NORM_BLOCK_PAIRS < kpairs ? p0 + DFP_NORM_BLOCK_PAIRS : kpairs;
      chunk[0][count] = width == 6 && p1 - p0 == DFP_NORM_BLOCK_PAIRS ? six_row_sums(block + p0 * 12, &least)
                                                                     : eight_row_sums(block, p0, p1, width, g, &least);
      if (two_groups) chunk[1][count] = eight_row_sums(block, p0, p1, width, g + 8, &least);
    }
    fold_levels(chunk[0], count, top);
    if (two_groups) fold_levels(chunk[1], count, top);
  }
  for (int level = 0; level < DFP_NORM_LEVELS; ++level) {
    const size_t pairs = (size_t)DFP_NORM_BLOCK_PAIRS << level;
    bounds[level] = 256 * ((uint64_t)max_lane(top[level]) + (pairs < kpairs ? pairs : kpairs));
  }
  const __m256i low = _mm256_cmpeq_epi16(least, _mm256_set1_epi16(INT16_MIN));
  return !_mm256_testz_si256(low, low);
}

/* The fine levels as dfp_fine_bounds_portable's, eight lanes (rows) at a time. */
void dfp_fine_bounds_avx2(const int16_t* block, size_t kpairs, int width, uint64_t* bounds) {
  const __m256i one = _mm256_set1_epi32(1);
  __m256i two = _mm256_setzero_si256(), four = _mm256_setzero_si256();
  for (int g = 0; g < width; g += 8) {
    const lane_group lanes = lane_group_of(width, g);
    for (size_t p0 = 0; p0 < kpairs; p0 += 4) {
      __m256i half[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      for (size_t p = p0; p < p0 + 4 && p < kpairs; ++p) {
        const __m256i v = load_lanes(block + (p * (size_t)width + (size_t)g) * 2, lanes);
        half[(p - p0) / 2] = _mm256_add_epi32(half[(p - p0) / 2], _mm256_madd_epi16(v, v));
      }
      two = _mm256_max_epu32(two, _mm256_max_epu32(half[0], half[1]));
      const __m256i both = _mm256_add_epi32(_mm256_srli_epi32(_mm256_add_epi32(half[0], one), 1),
                                            _mm256_srli_epi32(_mm256_add_epi32(half[1], one), 1));
      four = _mm256_max_epu32(four, both);
    }
  }
  bounds[0] = max_lane(two);
  bounds[1] = 2 * (uint64_t)max_lane(four);
}
