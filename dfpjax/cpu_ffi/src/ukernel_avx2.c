/* AVX2 microkernel, 6 x 16: vpmaddwd multiplies INT16 pairs into INT32, vpaddd accumulates.
 * The k loop, chunks and carries included, is one block of inline assembly on fixed
 * registers (ymm0-11 hold the twelve accumulators): with intrinsics, or with the chunk loop
 * in C, GCC moves the accumulators through the stack at every chunk and loses up to 30%. */
#include <immintrin.h>

#include "spill256.h"
#include "ukernel.h"

enum { MR = 6, NR = 16 };
DFP_CHECK_TILE(MR, NR);

/* Pair p: both B vectors times each row's broadcast pair, into ymm(2i) and ymm(2i + 1). */
#define PAIR(p)                                                                         \
  "vmovdqu " #p "*64(%[b]), %%ymm12\n\t"                                                \
  "vmovdqu " #p "*64+32(%[b]), %%ymm13\n\t"                                             \
  ROW(p, 0, 0, 1) ROW(p, 1, 2, 3) ROW(p, 2, 4, 5) ROW(p, 3, 6, 7) ROW(p, 4, 8, 9)        \
  ROW(p, 5, 10, 11)

#define ROW(p, i, c0, c1)                                                               \
  "vpbroadcastd " #p "*24+" #i "*4(%[a]), %%ymm15\n\t"                                  \
  "vpmaddwd %%ymm12, %%ymm15, %%ymm14\n\t"                                              \
  "vpaddd %%ymm14, %%ymm" #c0 ", %%ymm" #c0 "\n\t"                                      \
  "vpmaddwd %%ymm13, %%ymm15, %%ymm15\n\t"                                              \
  "vpaddd %%ymm15, %%ymm" #c1 ", %%ymm" #c1 "\n\t"

/* Accumulator c keeps its low 16 bits (mask in ymm12) and adds c >> 16 to carry[c]. */
#define CARRY(c)                                                                        \
  "vpsrad $16, %%ymm" #c ", %%ymm13\n\t"                                                \
  "vpaddd " #c "*32(%[carry]), %%ymm13, %%ymm13\n\t"                                    \
  "vmovdqu %%ymm13, " #c "*32(%[carry])\n\t"                                            \
  "vpand %%ymm12, %%ymm" #c ", %%ymm" #c "\n\t"

#define ZERO(c) "vpxor %%xmm" #c ", %%xmm" #c ", %%xmm" #c "\n\t"
#define ZERO_CARRY(c) "vmovdqu %%ymm0, " #c "*32(%[carry])\n\t"
#define STORE(c) "vmovdqu %%ymm" #c ", " #c "*32(%[low])\n\t"
#define ALL12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* The tile's sums as low lanes and carries: between chunks each accumulator carries all but
 * its low 16 bits into an int32 lane in memory (ukernel.h), four instructions a vector, where
 * an int64 spill takes nine. */
static inline __attribute__((always_inline)) void accumulate(size_t kpairs, size_t chunk, const int16_t* a,
                                                             const int16_t* b, __m256i* low, __m256i* carry) {
  __asm__ volatile(
      ALL12(ZERO)
      ALL12(ZERO_CARRY)
      "5:\n\t"
      "mov %[chunk], %%rcx\n\t"
      "cmp %[k], %%rcx\n\t"
      "cmova %[k], %%rcx\n\t"
      "sub %%rcx, %[k]\n\t"
      /* Unrolled by four pairs: short loops of a fixed trip count predict perfectly. */
      "mov %%rcx, %%rax\n\t"
      "shr $2, %%rax\n\t"
      "jz 2f\n\t"
      "1:\n\t"
      PAIR(0) PAIR(1) PAIR(2) PAIR(3)
      "add $96, %[a]\n\t"
      "add $256, %[b]\n\t"
      "dec %%rax\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      "and $3, %%rcx\n\t"
      "jz 4f\n\t"
      "3:\n\t"
      PAIR(0)
      "add $24, %[a]\n\t"
      "add $64, %[b]\n\t"
      "dec %%rcx\n\t"
      "jnz 3b\n\t"
      "4:\n\t"
      "test %[k], %[k]\n\t"
      "jz 6f\n\t"
      "vpcmpeqd %%ymm12, %%ymm12, %%ymm12\n\t"
      "vpsrld $16, %%ymm12, %%ymm12\n\t"
      ALL12(CARRY)
      "jmp 5b\n\t"
      "6:\n\t"
      ALL12(STORE)
      : [a] "+r"(a), [b] "+r"(b), [k] "+r"(kpairs)
      : [chunk] "r"(chunk), [carry] "r"(carry), [low] "r"(low)
      : "rax", "rcx", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}

static void ukernel(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int64_t* acc,
                    size_t ldc, int add) {
  __m256i carry[MR * 2], low[MR * 2];
  accumulate(kpairs, chunk, a, b, low, carry);
  const int carried = chunk < kpairs;
  for (int i = 0; i < MR * 2; ++i)
    dfp_spill256(low[i], carried ? &carry[i] : NULL, acc + (i / 2) * ldc + (i % 2) * 8, add);
}

/* Where the tile's lanes and carries fold into int32 sums (spill256.h), each converted
 * straight to float32; else each through double. */
static inline __attribute__((always_inline)) void encode_tile(size_t kpairs, size_t chunk, const int16_t* a,
                                                              const int16_t* b, uint32_t* out, size_t ldo,
                                                              const int32_t* scale, int stream) {
  __m256i carry[MR * 2], low[MR * 2], sum[MR * 2];
  accumulate(kpairs, chunk, a, b, low, carry);
  if (chunk < kpairs) {
    __m256i mismatch = _mm256_setzero_si256();
#pragma GCC unroll 12
    for (int i = 0; i < MR * 2; ++i) sum[i] = dfp_fold256(low[i], carry[i], &mismatch);
    if (!_mm256_testz_si256(mismatch, mismatch)) {
#pragma GCC unroll 12
      for (int i = 0; i < MR * 2; ++i)
        dfp_encode256(low[i], &carry[i], _mm256_set1_epi32(scale[i / 2]), out + (i / 2) * ldo + (i % 2) * 8, stream);
      return;
    }
  } else {
#pragma GCC unroll 12
    for (int i = 0; i < MR * 2; ++i) sum[i] = low[i];
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR * 2; ++i)
    dfp_encode256_s32(sum[i], _mm256_set1_epi32(scale[i / 2]), out + (i / 2) * ldo + (i % 2) * 8, stream);
}

DFP_DEFINE_F32_ENCODERS(encode_tile)

const dfp_ukernel dfp_ukernel_avx2 = {MR, NR, ukernel, ukernel_f32, ukernel_f32_stream};
