/* The microkernel of the three x86 paths, written once for either vector width (a template, as
 * XNNPACK generates its microkernels): the including file (ukernel_avx2.c, ukernel_avx_vnni.c,
 * ukernel_avx512_vnni.c) defines MR and NR (NR: two vectors of INT32 lanes), VECTOR_BITS (256 or
 * 512), V_DPWSSD (c + the products of a's and b's INT16 pairs, summed per INT32 lane: vpdpwssd,
 * or on AVX2 vpmaddwd then vpaddd, the same sums modulo 2**32), V_SPILL (its INT64 spill: low
 * lanes, carries or NULL, int64 tile row, add), V_ENCODE (its float32 encoding: low lanes,
 * carries or NULL, the row's scale bits in every lane, output row, whether to store it
 * non-temporally) and its fast route where a tile's sums fit in int32 (spill256.h): V_FOLD (low
 * lanes, carries, a vector that turns nonzero where a lane's sum does not fit -> the sums),
 * V_ANY (whether a vector is nonzero) and V_ENCODE_S32 (sums, scale bits, output row,
 * non-temporally or not), then includes this file, which defines the static `ukernel`,
 * `ukernel_f32`, `ukernel_f32_stream` and `ukernel_s32` of ukernel.h's contract. Between chunks
 * each accumulator carries all but its low 16 bits out. GCC builds the inner loop clean only
 * without its partial redundancy elimination (CMakeLists.txt, tests/test_ukernel_loops.py). */
#define DFP_CAT3_(a, b, c) a##b##c
#define DFP_CAT3(a, b, c) DFP_CAT3_(a, b, c)
#define VEC DFP_CAT3(__m, VECTOR_BITS, i)
#define V(op) DFP_CAT3(_mm, VECTOR_BITS, _##op)
#define V_SI(op) DFP_CAT3(V(op), _si, VECTOR_BITS)

static inline VEC broadcast_pair(const int16_t* p) {
  int32_t w;
  memcpy(&w, p, sizeof w);
  return V(set1_epi32)(w);
}

/* The tile's sums as low lanes c and carries. */
static inline __attribute__((always_inline)) void accumulate(size_t kpairs, size_t chunk, const int16_t* a,
                                                             const int16_t* b, VEC c[MR][2], VEC carry[MR][2]) {
  const VEC low16 = V(set1_epi32)(0xffff);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = carry[i][0] = carry[i][1] = V_SI(setzero)();
  for (size_t done = 0; done < kpairs; done += chunk) {
    const size_t n = chunk < kpairs - done ? chunk : kpairs - done;
    if (done > 0) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 2; ++j) {
          carry[i][j] = V(add_epi32)(carry[i][j], V(srai_epi32)(c[i][j], 16));
          c[i][j] = V_SI(and)(c[i][j], low16);
        }
    }
    for (size_t p = 0; p < n; ++p, a += 2 * MR, b += 2 * NR) {
      const VEC b0 = V_SI(loadu)((const void*)b);
      const VEC b1 = V_SI(loadu)((const void*)(b + NR));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const VEC ai = broadcast_pair(a + 2 * i);
        c[i][0] = V_DPWSSD(c[i][0], ai, b0);
        c[i][1] = V_DPWSSD(c[i][1], ai, b1);
      }
    }
  }
}

static void ukernel(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int64_t* acc,
                    size_t ldc, int add) {
  VEC c[MR][2], carry[MR][2];
  accumulate(kpairs, chunk, a, b, c, carry);
  const int carried = chunk < kpairs;
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    V_SPILL(c[i][0], carried ? &carry[i][0] : NULL, acc + i * ldc, add);
    V_SPILL(c[i][1], carried ? &carry[i][1] : NULL, acc + i * ldc + NR / 2, add);
  }
}

/* sum = the tile's lanes and carries folded into int32 (V_FOLD; sum may be c); whether a sum
 * does not fit. */
static inline __attribute__((always_inline)) int fold_tile(VEC c[MR][2], VEC carry[MR][2], VEC sum[MR][2]) {
  VEC mismatch = V_SI(setzero)();
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) sum[i][j] = V_FOLD(c[i][j], carry[i][j], &mismatch);
  return V_ANY(mismatch);
}

/* The tile's int32 sums where its lanes and carries fold into them, else nothing. */
static int ukernel_s32(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int32_t* out, size_t ldo) {
  VEC c[MR][2], carry[MR][2];
  accumulate(kpairs, chunk, a, b, c, carry);
  if (chunk < kpairs && fold_tile(c, carry, c)) return 0;
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    V_SI(storeu)((void*)(out + i * ldo), c[i][0]);
    V_SI(storeu)((void*)(out + i * ldo + NR / 2), c[i][1]);
  }
  return 1;
}

/* Where the tile's lanes and carries fold into int32 sums (V_FOLD), each converted straight to
 * float32 (V_ENCODE_S32); else each through double (V_ENCODE). */
static inline __attribute__((always_inline)) void encode_tile(size_t kpairs, size_t chunk, const int16_t* a,
                                                              const int16_t* b, uint32_t* out, size_t ldo,
                                                              const int32_t* scale, int stream) {
  VEC c[MR][2], carry[MR][2], sum[MR][2];
  accumulate(kpairs, chunk, a, b, c, carry);
  if (chunk < kpairs) {
    if (fold_tile(c, carry, sum)) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const VEC row_scale = V(set1_epi32)(scale[i]);
        V_ENCODE(c[i][0], &carry[i][0], row_scale, out + i * ldo, stream);
        V_ENCODE(c[i][1], &carry[i][1], row_scale, out + i * ldo + NR / 2, stream);
      }
      return;
    }
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) sum[i][0] = c[i][0], sum[i][1] = c[i][1];
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const VEC row_scale = V(set1_epi32)(scale[i]);
    V_ENCODE_S32(sum[i][0], row_scale, out + i * ldo, stream);
    V_ENCODE_S32(sum[i][1], row_scale, out + i * ldo + NR / 2, stream);
  }
}

DFP_DEFINE_F32_ENCODERS(encode_tile)

#undef V_SI
#undef V
#undef VEC
#undef DFP_CAT3
#undef DFP_CAT3_
