/* Verification builds only (CMake option DFPJAX_EMULATE_VNNI): force-included into the two
 * VNNI microkernels and the AVX-512 quantization rows so that they compile for plain AVX2 with
 * SIMDe's portable definitions of the instructions this CPU lacks (vpdpwssd, and what the
 * AVX-512 code uses around it). Their C code, tile shapes and the macro-loops around them then
 * run, bit for bit, on a machine without VNNI, about two orders of magnitude slower. Release
 * builds never see it. */
#ifndef DFPJAX_VNNI_EMULATION_H_
#define DFPJAX_VNNI_EMULATION_H_

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

/* AVX-VNNI's VEX form has the semantics of the EVEX 256-bit one SIMDe provides. */
#define _mm256_dpwssd_avx_epi32 simde_mm256_dpwssd_epi32

/* vpmovsxdq zmm, ymm, vpsrad zmm, imm, the float32 encoding's vcvtdq2pd zmm, ymm, vcvtpd2ps
 * ymm, zmm and vcvtdq2ps zmm, zmm, and vmovntdq m512, zmm: missing from SIMDe 0.7. */
static inline simde__m512i dfp_emulated_cvtepi32_epi64(simde__m256i v) {
  simde__m256i_private a = simde__m256i_to_private(v);
  simde__m512i_private r;
  for (int i = 0; i < 8; ++i) r.i64[i] = a.i32[i];
  return simde__m512i_from_private(r);
}
#define _mm512_cvtepi32_epi64 dfp_emulated_cvtepi32_epi64

static inline simde__m512i dfp_emulated_srai_epi32(simde__m512i v, int shift) {
  simde__m512i_private a = simde__m512i_to_private(v), r;
  for (int i = 0; i < 16; ++i) r.i32[i] = a.i32[i] >> shift; /* arithmetic in GCC and Clang */
  return simde__m512i_from_private(r);
}
#define _mm512_srai_epi32 dfp_emulated_srai_epi32

static inline simde__m512d dfp_emulated_cvtepi32_pd(simde__m256i v) {
  simde__m256i_private a = simde__m256i_to_private(v);
  simde__m512d_private r;
  for (int i = 0; i < 8; ++i) r.f64[i] = (double)a.i32[i]; /* exact */
  return simde__m512d_from_private(r);
}
#define _mm512_cvtepi32_pd dfp_emulated_cvtepi32_pd

static inline simde__m256 dfp_emulated_cvtpd_ps(simde__m512d v) {
  simde__m512d_private a = simde__m512d_to_private(v);
  simde__m256_private r;
  for (int i = 0; i < 8; ++i) r.f32[i] = (float)a.f64[i]; /* the current rounding mode, as vcvtpd2ps */
  return simde__m256_from_private(r);
}
#define _mm512_cvtpd_ps dfp_emulated_cvtpd_ps

static inline simde__m512 dfp_emulated_cvtepi32_ps(simde__m512i v) {
  simde__m512i_private a = simde__m512i_to_private(v);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = (float)a.i32[i]; /* the current rounding mode, as vcvtdq2ps */
  return simde__m512_from_private(r);
}
#define _mm512_cvtepi32_ps dfp_emulated_cvtepi32_ps

static inline void dfp_emulated_stream_si512(void* p, simde__m512i v) { simde_mm512_storeu_si512(p, v); }
#define _mm512_stream_si512 dfp_emulated_stream_si512 /* the same bytes; only the cache hint differs */

/* The quantization rows' (quantize_avx512.c): masked loads and the narrowing store, vpmovdw,
 * vcvtps2dq with its rounding embedded, and the reduction of a max. */
static inline simde__m512i dfp_emulated_maskz_loadu_epi32(simde__mmask16 k, const void* p) {
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = (k >> i) & 1 ? ((const int32_t*)p)[i] : 0; /* masked lanes unread */
  return simde__m512i_from_private(r);
}
#define _mm512_maskz_loadu_epi32 dfp_emulated_maskz_loadu_epi32

static inline simde__m512 dfp_emulated_maskz_loadu_ps(simde__mmask16 k, const void* p) {
  return simde_mm512_castsi512_ps(dfp_emulated_maskz_loadu_epi32(k, p));
}
#define _mm512_maskz_loadu_ps dfp_emulated_maskz_loadu_ps

static inline simde__m256i dfp_emulated_cvtepi32_epi16(simde__m512i v) {
  simde__m512i_private a = simde__m512i_to_private(v);
  simde__m256i_private r;
  for (int i = 0; i < 16; ++i) r.i16[i] = (int16_t)a.i32[i]; /* truncating, as vpmovdw */
  return simde__m256i_from_private(r);
}
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 dfp_emulated_cvtepi32_epi16

static inline void dfp_emulated_mask_cvtepi32_storeu_epi16(void* p, simde__mmask16 k, simde__m512i v) {
  simde__m256i_private r = simde__m256i_to_private(dfp_emulated_cvtepi32_epi16(v));
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) ((int16_t*)p)[i] = r.i16[i];
}
#define _mm512_mask_cvtepi32_storeu_epi16 dfp_emulated_mask_cvtepi32_storeu_epi16

/* Round to nearest even whatever the current mode: the one embedded rounding the rows use
 * (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); out of range, the integer indefinite. */
static inline simde__m512i dfp_emulated_cvt_roundps_epi32(simde__m512 v, int rounding) {
  (void)rounding;
  simde__m512_private a = simde__m512_to_private(v);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) {
    const float f = a.f32[i];
    if (!(f > -2147483648.0f && f < 2147483648.0f)) {
      r.i32[i] = INT32_MIN;
      continue;
    }
    const double below = __builtin_floor(f), rest = f - below; /* exact: f has 24 bits */
    const int64_t q = (int64_t)below;
    r.i32[i] = (int32_t)(q + (rest > 0.5 || (rest == 0.5 && (q & 1))));
  }
  return simde__m512i_from_private(r);
}
#undef _mm512_cvt_roundps_epi32
#define _mm512_cvt_roundps_epi32 dfp_emulated_cvt_roundps_epi32

static inline uint32_t dfp_emulated_reduce_max_epu32(simde__m512i v) {
  simde__m512i_private a = simde__m512i_to_private(v);
  uint32_t top = 0;
  for (int i = 0; i < 16; ++i) top = a.u32[i] > top ? a.u32[i] : top;
  return top;
}
#define _mm512_reduce_max_epu32 dfp_emulated_reduce_max_epu32

#endif
