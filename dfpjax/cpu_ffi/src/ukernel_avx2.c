/* AVX2 microkernel, 6 x 16: vpmaddwd multiplies INT16 pairs into INT32, vpaddd accumulates. */
#include <immintrin.h>
#include <string.h>

#include "spill256.h"
#include "ukernel.h"

enum { MR = 6, NR = 16 };
DFP_CHECK_TILE(MR, NR);
#define VECTOR_BITS 256
#define V_DPWSSD(c, a, b) _mm256_add_epi32(c, _mm256_madd_epi16(a, b))
#define V_SPILL dfp_spill256
#define V_ENCODE dfp_encode256
#define V_FOLD dfp_fold256
#define V_ANY(v) (!_mm256_testz_si256(v, v))
#define V_ENCODE_S32 dfp_encode256_s32
#include "ukernel_template.h"

const dfp_ukernel dfp_ukernel_avx2 = {MR, NR, ukernel, ukernel_f32, ukernel_f32_stream, ukernel_s32};
