/* AVX-VNNI microkernel, 6 x 16: vpdpwssd (VEX, 256-bit) fuses the pair multiply and the add. */
#include <immintrin.h>
#include <string.h>

#include "spill256.h"
#include "ukernel.h"

enum { MR = 6, NR = 16 };

static inline __m256i broadcast_pair(const int16_t* p) {
  int32_t w;
  memcpy(&w, p, sizeof w);
  return _mm256_set1_epi32(w);
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
  const int carried = chunk < kpairs;
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    dfp_spill256(c[i][0], carried ? &carry[i][0] : NULL, acc + i * ldc, add);
    dfp_spill256(c[i][1], carried ? &carry[i][1] : NULL, acc + i * ldc + 8, add);
  }
}

const dfp_ukernel dfp_ukernel_avx_vnni = {MR, NR, ukernel};
