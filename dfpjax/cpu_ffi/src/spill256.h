/* The INT64 spill of the 256-bit microkernels (ukernel_avx2.c, ukernel_avx_vnni.c; the
 * AVX-512 one spills at its own width): one accumulator of eight INT32 lanes with its carries
 * (ukernel.h). Include only from files compiled for AVX2. */
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

#endif
