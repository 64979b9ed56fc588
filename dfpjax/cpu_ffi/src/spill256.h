/* The epilogues of the 256-bit microkernels (ukernel_avx2.c, ukernel_avx_vnni.c; the AVX-512
 * one has its own width's): one accumulator of eight INT32 lanes with its carries (ukernel.h),
 * spilled to INT64 or encoded to float32. Include only from files compiled for AVX2. */
#ifndef DFPJAX_SPILL256_H_
#define DFPJAX_SPILL256_H_

#include <immintrin.h>
#include <stdint.h>

/* acc[0..7] (+)= carry * 2**16 + low in int64 (add: accumulate, else store); carry is NULL
 * when no chunk carried. */
static inline void dfp_spill256(__m256i low, const __m256i* carry, int64_t* acc, int add) {
  __m256i s0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(low));
  __m256i s1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(low, 1));
  if (carry != NULL) {
    const __m256i c = _mm256_loadu_si256(carry);
    s0 = _mm256_add_epi64(s0, _mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(c)), 16));
    s1 = _mm256_add_epi64(s1, _mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(c, 1)), 16));
  }
  __m256i* dst = (__m256i*)acc;
  if (add) {
    s0 = _mm256_add_epi64(_mm256_loadu_si256(dst), s0);
    s1 = _mm256_add_epi64(_mm256_loadu_si256(dst + 1), s1);
  }
  _mm256_storeu_si256(dst, s0);
  _mm256_storeu_si256(dst + 1, s1);
}

/* out[0..7] = the float32 bits of fl(carry * 2**16 + low) * 2**k, scale = k << 23 in every lane
 * with k a normal scale (ukernel.h's encode_f32): the sum is formed exactly in double (the
 * product is below 2**47, the sum an integer below 2**48) and rounded once, as the int64
 * output stage rounds it (encode_avx2.c); carry is NULL when no chunk carried. */
static inline void dfp_encode256(__m256i low, const __m256i* carry, __m256i scale, uint32_t* out) {
  __m256d s0 = _mm256_cvtepi32_pd(_mm256_castsi256_si128(low));
  __m256d s1 = _mm256_cvtepi32_pd(_mm256_extracti128_si256(low, 1));
  if (carry != NULL) {
    const __m256i c = _mm256_loadu_si256(carry);
    const __m256d shift = _mm256_set1_pd(65536.0);
    s0 = _mm256_add_pd(s0, _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(c)), shift));
    s1 = _mm256_add_pd(s1, _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(c, 1)), shift));
  }
  const __m256i bits = _mm256_castps_si256(_mm256_set_m128(_mm256_cvtpd_ps(s1), _mm256_cvtpd_ps(s0)));
  const __m256i zero = _mm256_cmpeq_epi32(bits, _mm256_setzero_si256()); /* zero sums stay +0 */
  _mm256_storeu_si256((__m256i*)out, _mm256_andnot_si256(zero, _mm256_add_epi32(bits, scale)));
}

#endif
