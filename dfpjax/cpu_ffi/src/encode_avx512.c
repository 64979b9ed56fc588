/* AVX-512 output stage of the avx512_vnni path: encode_avx2.c's common case (one exponent
 * for the row, a normal scale) eight lanes at a time, the same operations on wider vectors;
 * every other case, and any group of eight this fast path cannot prove exact, goes to the
 * AVX2 stage, which computes the same bits. */
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
