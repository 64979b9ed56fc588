/* AVX-VNNI microkernel, 6 x 16: vpdpwssd (VEX, 256-bit) fuses the pair multiply and the add. */
#include <immintrin.h>
#include <string.h>

#include "ukernel.h"

enum { MR = 6, NR = 16 };

static inline __m256i broadcast_pair(const int16_t* p) {
  int32_t w;
  memcpy(&w, p, sizeof w);
  return _mm256_set1_epi32(w);
}

/* acc[0..7] (+)= carry * 2**16 + low, in int64. */
static inline void spill(__m256i low, __m256i carry, int64_t* acc, int add) {
  __m256i s0 = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(low)),
                                      _mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(carry)), 16));
  __m256i s1 = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(low, 1)),
                                      _mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(carry, 1)), 16));
  __m256i* dst = (__m256i*)acc;
  if (add) {
    s0 = _mm256_add_epi64(_mm256_loadu_si256(dst), s0);
    s1 = _mm256_add_epi64(_mm256_loadu_si256(dst + 1), s1);
  }
  _mm256_storeu_si256(dst, s0);
  _mm256_storeu_si256(dst + 1, s1);
}

/* Between chunks each accumulator carries all but its low 16 bits out (ukernel.h). */
static void ukernel(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int64_t* acc,
                    size_t ldc, int add) {
  const __m256i low16 = _mm256_set1_epi32(0xffff);
  __m256i c[MR][2], carry[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = carry[i][0] = carry[i][1] = _mm256_setzero_si256();
  for (size_t done = 0; done < kpairs; done += chunk) {
    const size_t n = chunk < kpairs - done ? chunk : kpairs - done;
    if (done > 0) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 2; ++j) {
          carry[i][j] = _mm256_add_epi32(carry[i][j], _mm256_srai_epi32(c[i][j], 16));
          c[i][j] = _mm256_and_si256(c[i][j], low16);
        }
    }
    for (size_t p = 0; p < n; ++p, a += 2 * MR, b += 2 * NR) {
      const __m256i b0 = _mm256_loadu_si256((const __m256i*)b);
      const __m256i b1 = _mm256_loadu_si256((const __m256i*)(b + 16));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256i ai = broadcast_pair(a + 2 * i);
        c[i][0] = _mm256_dpwssd_avx_epi32(c[i][0], ai, b0);
        c[i][1] = _mm256_dpwssd_avx_epi32(c[i][1], ai, b1);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    spill(c[i][0], carry[i][0], acc + i * ldc, add);
    spill(c[i][1], carry[i][1], acc + i * ldc + 8, add);
  }
}

const dfp_ukernel dfp_ukernel_avx_vnni = {MR, NR, ukernel, 1};
