/* AVX2 quantization rows: dfp_quantize_one on eight lanes, by float arithmetic where that
 * is provably exact. */
#include <immintrin.h>

#include "quantize.h"

/* top raised by the magnitude bits of u's lanes: below 2**31, so a signed max is the unsigned one. */
static inline __m256i raise_top(__m256i top, __m256i u) {
  return _mm256_max_epi32(top, _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)));
}

static uint32_t horizontal_max(__m256i top) {
  __m128i t = _mm_max_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  t = _mm_max_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm_max_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  return (uint32_t)_mm_cvtsi128_si32(t);
}

uint32_t dfp_max_magnitude_avx2(const float* x, size_t n) {
  __m256i top = _mm256_setzero_si256();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) top = raise_top(top, _mm256_loadu_si256((const __m256i*)(x + i)));
  const uint32_t head = horizontal_max(top);
  const uint32_t tail = dfp_max_magnitude_portable(x + i, n - i);
  return head > tail ? head : tail;
}

/* Eight lanes of dfp_quantize_one as int32. Every quantity stays below 2**26, so signed
 * compares serve; srlv/sllv give 0 for counts of 32 and more. */
static inline __m256i quantize8(__m256i u, __m256i e, __m256i limit) {
  const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i biased = _mm256_srli_epi32(mag, 23);
  const __m256i is_normal = _mm256_cmpgt_epi32(biased, zero);
  const __m256i sig = _mm256_or_si256(_mm256_and_si256(mag, _mm256_set1_epi32(0x7fffff)),
                                      _mm256_and_si256(is_normal, _mm256_set1_epi32(0x800000)));
  const __m256i shift = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_max_epi32(biased, one),
                                                          _mm256_set1_epi32(150)), e);
  const __m256i left = _mm256_sllv_epi32(sig, _mm256_max_epi32(shift, zero));
  const __m256i r = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(zero, shift), zero),
                                     _mm256_set1_epi32(25));
  const __m256i q = _mm256_srlv_epi32(sig, r);
  const __m256i rem = _mm256_and_si256(sig, _mm256_sub_epi32(_mm256_sllv_epi32(one, r), one));
  const __m256i half = _mm256_srli_epi32(_mm256_sllv_epi32(one, r), 1);
  const __m256i tie_odd = _mm256_and_si256(_mm256_cmpeq_epi32(rem, half), _mm256_and_si256(q, one));
  const __m256i up = _mm256_and_si256(
      _mm256_or_si256(_mm256_cmpgt_epi32(rem, half), _mm256_cmpeq_epi32(tie_odd, one)),
      _mm256_cmpgt_epi32(r, zero));
  const __m256i rounded = _mm256_sub_epi32(q, up);  /* up is all ones: -1 adds one */
  const __m256i right_shifted = _mm256_cmpgt_epi32(r, zero);
  const __m256i v = _mm256_min_epi32(_mm256_blendv_epi8(left, rounded, right_shifted), limit);
  const __m256i negative = _mm256_srai_epi32(u, 31);
  return _mm256_sub_epi32(_mm256_xor_si256(v, negative), negative);
}

/* Sixteen lanes as x * 2**-e rounded to nearest even by the conversion itself, under the
 * MXCSR quantize_row_float sets, exact when 2**-e is a normal float
 * (-125 <= e <= 126): a normal product is exact, a subnormal one (or one of a subnormal input)
 * is below 1/2, so it converts to 0. |x * 2**-e| <= 2**15, so the conversion is exact and the
 * saturating pack leaves only -32768 (and, for limit < 32767, the lanes past +-limit) to clamp,
 * on sixteen bits: half the instructions of clamping each eight int32 lanes. */
static inline __m256i quantize16_float(__m256 x0, __m256 x1, __m256 scale, __m256i low, __m256i high, int clamp_high) {
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(x0, scale));
  const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(x1, scale));
  __m256i v = _mm256_max_epi16(_mm256_packs_epi32(a, b), low);
  if (clamp_high) v = _mm256_min_epi16(v, high);
  return v;
}

static inline void store16(int16_t* m, __m256i packed, int streamed) {
  /* packs works per 128-bit lane: restore the element order. */
  packed = _mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0));
  if (streamed)
    _mm256_stream_si256((__m256i*)m, packed);
  else
    _mm256_storeu_si256((__m256i*)m, packed);
}

/* The whole rows of sixteen by the float route, under an MXCSR of its own (round to nearest
 * even, no flush to zero, exceptions masked), restored after: the conversion rounds, where a
 * vroundps with its own rounding and int32 clamps took nearly twice the instructions in a loop
 * that, with the max, is bound by them (51 MB of floats maxed and quantized: 4.7 ms on one
 * Zen 3 core, 3.2-3.8 ms now). Each vector's magnitudes raise *top. */
static size_t quantize_row_float(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int streamed,
                                 __m256i* top) {
  const __m256 scale = _mm256_castsi256_ps(_mm256_set1_epi32((127 - e) << 23));
  const __m256i low = _mm256_set1_epi16((int16_t)-limit), high = _mm256_set1_epi16((int16_t)limit);
  const int clamp_high = limit < INT16_MAX;
  const unsigned int csr = _mm_getcsr();
  _mm_setcsr(0x1f80);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    *top = raise_top(raise_top(*top, _mm256_castps_si256(x0)), _mm256_castps_si256(x1));
    store16(m + i, quantize16_float(x0, x1, scale, low, high, clamp_high), streamed);
    _mm_prefetch((const char*)((uintptr_t)(x + i) + DFP_QUANTIZE_AHEAD * sizeof(float)), _MM_HINT_T0);
    _mm_prefetch((const char*)((uintptr_t)(x + i) + DFP_QUANTIZE_L2_AHEAD * sizeof(float)), _MM_HINT_T1);
  }
  _mm_setcsr(csr);
  return i;
}

uint32_t dfp_quantize_row_avx2(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream) {
  const int streamed = stream && (uintptr_t)m % 32 == 0;
  __m256i top = _mm256_setzero_si256();
  size_t i = 0;
  if (e >= -125 && e <= 126) {
    i = quantize_row_float(x, n, e, limit, m, streamed, &top);
  } else { /* scales past the normal floats */
    const __m256i ev = _mm256_set1_epi32(e), lv = _mm256_set1_epi32(limit);
    for (; i + 16 <= n; i += 16) {
      const __m256i u0 = _mm256_loadu_si256((const __m256i*)(x + i)), u1 = _mm256_loadu_si256((const __m256i*)(x + i + 8));
      top = raise_top(raise_top(top, u0), u1);
      store16(m + i, _mm256_packs_epi32(quantize8(u0, ev, lv), quantize8(u1, ev, lv)), streamed);
    }
  }
  if (streamed) _mm_sfence();
  const uint32_t head = horizontal_max(top), tail = dfp_quantize_row_portable(x + i, n - i, e, limit, m + i, 0);
  return head > tail ? head : tail;
}
