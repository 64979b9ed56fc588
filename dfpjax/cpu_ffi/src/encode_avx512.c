/* AVX-512 output stage of the avx512_vnni path: encode_avx2.c's common case (one exponent
 * for the row, a normal scale) eight lanes at a time, the same operations on wider vectors;
 * every other case, and any group of eight this fast path cannot prove exact, goes to the
 * AVX2 stage, which computes the same bits. And col2im's run adds, eight lanes a vector. */
#include <immintrin.h>

#include "encode.h"
#include "macro.h"

void dfp_encode_f32_avx512(const int64_t* s, size_t n, int32_t ea, const int32_t* eb, size_t eb_stride,
                           uint32_t* out) {
  if (eb_stride != 0 || !dfp_normal_scale(ea, eb[0])) {
    dfp_encode_f32_avx2(s, n, ea, eb, eb_stride, out);
    return;
  }
  /* Every |s| in [1, 2**51) lands on a normal float, so adding k to the exponent field is
   * exact scaling (encode.h). */
  const __m256i kbits = _mm256_set1_epi32((int32_t)((uint32_t)(ea + eb[0]) << 23));
  const __m512i bias51 = _mm512_set1_epi64(INT64_C(1) << 51), magic = _mm512_set1_epi64(0x4338000000000000LL);
  const __m512d magic_value = _mm512_set1_pd(6755399441055744.0);
  size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i v = _mm512_loadu_si512((const void*)(s + j));
    const __m512i high = _mm512_srli_epi64(_mm512_add_epi64(v, bias51), 52);
    if (_mm512_test_epi64_mask(high, high)) { /* some |s| >= 2**51 */
      dfp_encode_f32_avx2(s + j, 8, ea, eb, 0, out + j);
      continue;
    }
    /* s converts to double exactly (the 2**52 + 2**51 magic number), rounds once to f32. */
    const __m512d d = _mm512_sub_pd(_mm512_castsi512_pd(_mm512_add_epi64(v, magic)), magic_value);
    const __m256i bits = _mm256_castps_si256(_mm512_cvtpd_ps(d));
    const __m256i zero = _mm256_cmpeq_epi32(bits, _mm256_setzero_si256()); /* zero sums stay +0 */
    _mm256_storeu_si256((__m256i*)(out + j), _mm256_andnot_si256(zero, _mm256_add_epi32(bits, kbits)));
  }
  if (j < n) dfp_encode_f32_avx2(s + j, n - j, ea, eb, 0, out + j);
}

/* Eight lanes a vector, the last few by masks (AVX-512's masked stores, unlike AVX2's
 * vpmaskmovq, are full speed on AMD's cores): a stem's runs of 21 in three vectors. */
void dfp_add_runs_avx512(int64_t* dst, const size_t* offsets, const int64_t* src, size_t n, size_t runs) {
  const __mmask8 tail = (__mmask8)((1u << (n % 8)) - 1);
  for (size_t r = 0; r < runs; ++r, src += n) {
    int64_t* d = dst + offsets[r];
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm512_storeu_si512((void*)(d + j), _mm512_add_epi64(_mm512_loadu_si512((const void*)(d + j)),
                                                           _mm512_loadu_si512((const void*)(src + j))));
    if (tail)
      _mm512_mask_storeu_epi64(d + j, tail, _mm512_add_epi64(_mm512_maskz_loadu_epi64(tail, d + j),
                                                             _mm512_maskz_loadu_epi64(tail, src + j)));
  }
}
