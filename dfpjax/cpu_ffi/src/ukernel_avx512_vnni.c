/* AVX-512 VNNI microkernel, 8 x 32: vpdpwssd on zmm, 16 accumulators of 16 INT32 lanes. */
#include <immintrin.h>
#include <string.h>

#include "ukernel.h"

enum { MR = 8, NR = 32 };

static inline __m512i broadcast_pair(const int16_t* p) {
  int32_t w;
  memcpy(&w, p, sizeof w);
  return _mm512_set1_epi32(w);
}

/* acc[0..15] (+)= carry * 2**16 + low, in int64. */
static inline void spill(__m512i low, __m512i carry, int64_t* acc, int add) {
  __m512i s0 = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(low)),
                                _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(carry)), 16));
  __m512i s1 = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(low, 1)),
                                _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(carry, 1)), 16));
  if (add) {
    s0 = _mm512_add_epi64(_mm512_loadu_si512(acc), s0);
    s1 = _mm512_add_epi64(_mm512_loadu_si512(acc + 8), s1);
  }
  _mm512_storeu_si512(acc, s0);
  _mm512_storeu_si512(acc + 8, s1);
}

/* Between chunks each accumulator carries all but its low 16 bits out (ukernel.h). */
static void ukernel(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int64_t* acc,
                    size_t ldc, int add) {
  const __m512i low16 = _mm512_set1_epi32(0xffff);
  __m512i c[MR][2], carry[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = carry[i][0] = carry[i][1] = _mm512_setzero_si512();
  for (size_t done = 0; done < kpairs; done += chunk) {
    const size_t n = chunk < kpairs - done ? chunk : kpairs - done;
    if (done > 0) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 2; ++j) {
          carry[i][j] = _mm512_add_epi32(carry[i][j], _mm512_srai_epi32(c[i][j], 16));
          c[i][j] = _mm512_and_si512(c[i][j], low16);
        }
    }
    for (size_t p = 0; p < n; ++p, a += 2 * MR, b += 2 * NR) {
      const __m512i b0 = _mm512_loadu_si512(b);
      const __m512i b1 = _mm512_loadu_si512(b + 32);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512i ai = broadcast_pair(a + 2 * i);
        c[i][0] = _mm512_dpwssd_epi32(c[i][0], ai, b0);
        c[i][1] = _mm512_dpwssd_epi32(c[i][1], ai, b1);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    spill(c[i][0], carry[i][0], acc + i * ldc, add);
    spill(c[i][1], carry[i][1], acc + i * ldc + 16, add);
  }
}

const dfp_ukernel dfp_ukernel_avx512_vnni = {MR, NR, ukernel};
