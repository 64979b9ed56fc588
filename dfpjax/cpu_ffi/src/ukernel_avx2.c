/* AVX2 microkernel, 6 x 16: vpmaddwd multiplies INT16 pairs into INT32, vpaddd accumulates.
 * The k loop is inline assembly: with intrinsics GCC rotates the twelve accumulators
 * through extra register moves and loses about 30% of the throughput. */
#include <immintrin.h>

#include "ukernel.h"

enum { MR = 6, NR = 16 };

static inline void spill(__m256i v, int64_t* dst) {
  __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v));
  __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1));
  _mm256_storeu_si256((__m256i*)dst, _mm256_add_epi64(_mm256_loadu_si256((const __m256i*)dst), lo));
  _mm256_storeu_si256((__m256i*)(dst + 4),
                      _mm256_add_epi64(_mm256_loadu_si256((const __m256i*)(dst + 4)), hi));
}

/* Pair p, row i: broadcast the row's pair, multiply with both B vectors, accumulate. */
#define PAIR(p)                                                                         \
  "vmovdqu " #p "*64(%[b]), %%ymm12\n\t"                                                \
  "vmovdqu " #p "*64+32(%[b]), %%ymm13\n\t"                                             \
  ROW(p, 0, c00, c01) ROW(p, 1, c10, c11) ROW(p, 2, c20, c21) ROW(p, 3, c30, c31)        \
  ROW(p, 4, c40, c41) ROW(p, 5, c50, c51)

#define ROW(p, i, c0, c1)                                                               \
  "vpbroadcastd " #p "*24+" #i "*4(%[a]), %%ymm15\n\t"                                  \
  "vpmaddwd %%ymm12, %%ymm15, %%ymm14\n\t"                                              \
  "vpaddd %%ymm14, %[" #c0 "], %[" #c0 "]\n\t"                                          \
  "vpmaddwd %%ymm13, %%ymm15, %%ymm15\n\t"                                              \
  "vpaddd %%ymm15, %[" #c1 "], %[" #c1 "]\n\t"

static void ukernel(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int64_t* acc,
                    size_t ldc) {
  for (size_t done = 0; done < kpairs; done += chunk) {
    size_t n = chunk < kpairs - done ? chunk : kpairs - done;
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
            c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    /* Unrolled by four pairs: short loops of a fixed trip count predict perfectly. */
    __asm__ volatile(
        "mov %[n], %%rax\n\t"
        "shr $2, %%rax\n\t"
        "jz 2f\n\t"
        "1:\n\t"
        PAIR(0) PAIR(1) PAIR(2) PAIR(3)
        "add $96, %[a]\n\t"
        "add $256, %[b]\n\t"
        "dec %%rax\n\t"
        "jnz 1b\n\t"
        "2:\n\t"
        "and $3, %[n]\n\t"
        "jz 4f\n\t"
        "3:\n\t"
        PAIR(0)
        "add $24, %[a]\n\t"
        "add $64, %[b]\n\t"
        "dec %[n]\n\t"
        "jnz 3b\n\t"
        "4:\n\t"
        : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n), [c00] "+x"(c00),
          [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20), [c21] "+x"(c21),
          [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41), [c50] "+x"(c50),
          [c51] "+x"(c51)
        :
        : "rax", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
    const __m256i c[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int i = 0; i < MR; ++i) {
      spill(c[i][0], acc + i * ldc);
      spill(c[i][1], acc + i * ldc + 8);
    }
  }
}

const dfp_ukernel dfp_ukernel_avx2 = {MR, NR, ukernel, 1};
