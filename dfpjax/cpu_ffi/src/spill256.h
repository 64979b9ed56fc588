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

/* A row of 8 float32 bits; non-temporal (stream) into a 32-byte aligned row. */
static inline void dfp_store256(uint32_t* out, __m256i bits, int stream) {
  if (stream)
    _mm256_stream_si256((__m256i*)out, bits);
  else
    _mm256_storeu_si256((__m256i*)out, bits);
}

/* out[0..7] = the float32 bits of fl(carry * 2**16 + low) * 2**k, scale = k << 23 in every lane
 * with k a normal scale (ukernel.h's encode_f32): the sum is formed exactly in double (the
 * product is below 2**47, the sum an integer below 2**48) and rounded once, as the int64
 * output stage rounds it (encode_avx2.c); carry is NULL when no chunk carried. */
static inline void dfp_encode256(__m256i low, const __m256i* carry, __m256i scale, uint32_t* out, int stream) {
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
  dfp_store256(out, _mm256_andnot_si256(zero, _mm256_add_epi32(bits, scale)), stream);
}

/* The sum carry * 2**16 + low of each lane as one int32, exact where it fits (the sums of short
 * reductions mostly do): high = carry + (low >> 16) is the sum's part above its low 16 bits (no
 * int32 overflow: a carry grows by at most 2**15 a chunk, ukernel.h), and the wrapped sum
 * (carry << 16) + low is the sum itself iff high fits in 16 signed bits, i.e. iff the wrapped
 * sum's own top half is high. *mismatch gathers the lanes where it is not (all zero: all fit). */
static inline __m256i dfp_fold256(__m256i low, __m256i carry, __m256i* mismatch) {
  const __m256i high = _mm256_add_epi32(carry, _mm256_srai_epi32(low, 16));
  const __m256i sum = _mm256_add_epi32(_mm256_slli_epi32(carry, 16), low);
  *mismatch = _mm256_or_si256(*mismatch, _mm256_xor_si256(_mm256_srai_epi32(sum, 16), high));
  return sum;
}

/* dfp_encode256 of exact int32 sums: vcvtdq2ps rounds each once, to nearest even as the
 * double route's vcvtpd2ps does (the rounding mode both rely on; an integer never lands on a
 * subnormal, so no flush mode changes it), in five instructions where that route takes
 * twelve. */
static inline void dfp_encode256_s32(__m256i sum, __m256i scale, uint32_t* out, int stream) {
  const __m256i bits = _mm256_castps_si256(_mm256_cvtepi32_ps(sum));
  const __m256i zero = _mm256_cmpeq_epi32(sum, _mm256_setzero_si256()); /* zero sums stay +0 */
  dfp_store256(out, _mm256_andnot_si256(zero, _mm256_add_epi32(bits, scale)), stream);
}

#endif
