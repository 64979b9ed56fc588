/* AVX-512 VNNI microkernel, 8 x 32: vpdpwssd on zmm, 16 accumulators of 16 INT32 lanes. */
#include <immintrin.h>
#include <string.h>

#include "spill256.h"
#include "ukernel.h"

enum { MR = 8, NR = 32 };

/* acc[0..15] (+)= carry * 2**16 + low, in int64: the 256-bit spill of each half (once per
 * tile, outside the k loop); carry is NULL when no chunk carried. */
static inline void spill(__m512i low, const __m512i* carry, int64_t* acc, int add) {
  const __m256i* halves = (const __m256i*)carry;
  dfp_spill256(_mm512_castsi512_si256(low), carry != NULL ? halves : NULL, acc, add);
  dfp_spill256(_mm512_extracti64x4_epi64(low, 1), carry != NULL ? halves + 1 : NULL, acc + 8, add);
}

#define VNNI_BITS 512
#define V_DPWSSD _mm512_dpwssd_epi32
#define V_SPILL spill
#include "ukernel_vnni.h"

const dfp_ukernel dfp_ukernel_avx512_vnni = {MR, NR, ukernel};
