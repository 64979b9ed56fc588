/* AVX-512 VNNI microkernel, 8 x 32: vpdpwssd on zmm, 16 accumulators of 16 INT32 lanes. */
#include <immintrin.h>
#include <string.h>

#include "ukernel.h"

enum { MR = 8, NR = 32 };
DFP_CHECK_TILE(MR, NR);

/* acc[0..15] (+)= carry * 2**16 + low, in int64 (add: accumulate, else store), at full width:
 * two vpmovsxdq and two stores of eight lanes per accumulator, half the instructions of two
 * 256-bit spills (spill256.h), once per tile; carry is NULL when no chunk carried. */
static inline void spill(__m512i low, const __m512i* carry, int64_t* acc, int add) {
  __m512i s0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(low));
  __m512i s1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(low, 1));
  if (carry != NULL) {
    const __m512i c = _mm512_loadu_si512((const void*)carry);
    s0 = _mm512_add_epi64(s0, _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(c)), 16));
    s1 = _mm512_add_epi64(s1, _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(c, 1)), 16));
  }
  if (add) {
    s0 = _mm512_add_epi64(_mm512_loadu_si512((const void*)acc), s0);
    s1 = _mm512_add_epi64(_mm512_loadu_si512((const void*)(acc + 8)), s1);
  }
  _mm512_storeu_si512((void*)acc, s0);
  _mm512_storeu_si512((void*)(acc + 8), s1);
}

/* spill256.h's dfp_store256 at this width: non-temporal (stream) into a 64-byte aligned row. */
static inline void store_row(uint32_t* out, __m512i bits, int stream) {
  if (stream)
    _mm512_stream_si512((void*)out, bits);
  else
    _mm512_storeu_si512((void*)out, bits);
}

/* out[0..15] = the float32 bits of fl(carry * 2**16 + low) * 2**k, scale = k << 23 in every
 * lane (spill256.h's dfp_encode256 at this width: the sum exact in double, rounded once). */
static inline void encode(__m512i low, const __m512i* carry, __m512i scale, uint32_t* out, int stream) {
  __m512d s0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(low));
  __m512d s1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(low, 1));
  if (carry != NULL) {
    const __m512i c = _mm512_loadu_si512((const void*)carry);
    const __m512d shift = _mm512_set1_pd(65536.0);
    s0 = _mm512_add_pd(s0, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(c)), shift));
    s1 = _mm512_add_pd(s1, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(c, 1)), shift));
  }
  const __m512i bits = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_castps_si256(_mm512_cvtpd_ps(s0))),
                                          _mm256_castps_si256(_mm512_cvtpd_ps(s1)), 1);
  const __mmask16 nonzero = _mm512_test_epi32_mask(bits, bits); /* zero sums stay +0 */
  store_row(out, _mm512_maskz_add_epi32(nonzero, bits, scale), stream);
}

/* spill256.h's dfp_fold256 and dfp_encode256_s32 at this width. */
static inline __m512i fold(__m512i low, __m512i carry, __m512i* mismatch) {
  const __m512i high = _mm512_add_epi32(carry, _mm512_srai_epi32(low, 16));
  const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(carry, 16), low);
  *mismatch = _mm512_or_si512(*mismatch, _mm512_xor_si512(_mm512_srai_epi32(sum, 16), high));
  return sum;
}

static inline void encode_s32(__m512i sum, __m512i scale, uint32_t* out, int stream) {
  const __m512i bits = _mm512_castps_si512(_mm512_cvtepi32_ps(sum));
  const __mmask16 nonzero = _mm512_test_epi32_mask(sum, sum); /* zero sums stay +0 */
  store_row(out, _mm512_maskz_add_epi32(nonzero, bits, scale), stream);
}

#define VECTOR_BITS 512
#define V_DPWSSD _mm512_dpwssd_epi32
#define V_SPILL spill
#define V_ENCODE encode
#define V_FOLD fold
#define V_ANY(v) (_mm512_test_epi32_mask(v, v) != 0)
#define V_ENCODE_S32 encode_s32
#include "ukernel_template.h"

const dfp_ukernel dfp_ukernel_avx512_vnni = {MR, NR, ukernel, ukernel_f32, ukernel_f32_stream, ukernel_s32};
