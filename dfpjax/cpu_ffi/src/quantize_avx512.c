/* AVX-512 quantization rows of the avx512_vnni path: quantize_avx2.c's max and float route on
 * sixteen lanes, the tails by masks; the integer route (scales 2**-e that are not
 * normal floats) stays AVX2's. The same bits as the portable rows (quantize.h). */
#include <immintrin.h>

#include "quantize.h"

/* top raised by the magnitude bits of v's lanes. */
static inline __m512i raise_top(__m512i top, __m512 v) {
  return _mm512_max_epu32(top, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

uint32_t dfp_max_magnitude_avx512(const float* x, size_t n) {
  __m512i top = _mm512_setzero_si512();
  size_t i = 0;
  for (; i + 16 <= n; i += 16) top = raise_top(top, _mm512_loadu_ps(x + i));
  top = raise_top(top, _mm512_maskz_loadu_ps((__mmask16)((1u << (n - i)) - 1), x + i));
  return _mm512_reduce_max_epu32(top);
}

/* Sixteen lanes as x * 2**-e rounded to nearest even by the conversion's own rounding,
 * exact when 2**-e is a normal float (quantize_avx2.c: quantize16_float), clamped to +-limit. */
static inline __m512i quantize16_float(__m512 x, __m512 scale, __m512i limit) {
  const __m512i v = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_max_epi32(_mm512_min_epi32(v, limit), _mm512_sub_epi32(_mm512_setzero_si512(), limit));
}

uint32_t dfp_quantize_row_avx512(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream) {
  if (e < -125 || e > 126) return dfp_quantize_row_avx2(x, n, e, limit, m, stream);
  const __m512 scale = _mm512_castsi512_ps(_mm512_set1_epi32((127 - e) << 23));
  const __m512i lv = _mm512_set1_epi32(limit);
  const int streamed = stream && (uintptr_t)m % 32 == 0;
  __m512i top = _mm512_setzero_si512();
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    top = raise_top(top, v);
    const __m256i q = _mm512_cvtepi32_epi16(quantize16_float(v, scale, lv));
    if (streamed)
      _mm256_stream_si256((__m256i*)(m + i), q);
    else
      _mm256_storeu_si256((__m256i*)(m + i), q);
    _mm_prefetch((const char*)((uintptr_t)(x + i) + DFP_QUANTIZE_AHEAD * sizeof(float)), _MM_HINT_T0);
    _mm_prefetch((const char*)((uintptr_t)(x + i) + DFP_QUANTIZE_L2_AHEAD * sizeof(float)), _MM_HINT_T1);
  }
  if (streamed) _mm_sfence();
  const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
  const __m512 v = _mm512_maskz_loadu_ps(tail, x + i);
  top = raise_top(top, v);
  _mm512_mask_cvtepi32_storeu_epi16(m + i, tail, quantize16_float(v, scale, lv));
  return _mm512_reduce_max_epu32(top);
}
