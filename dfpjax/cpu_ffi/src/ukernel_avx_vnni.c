/* AVX-VNNI microkernel, 6 x 16: vpdpwssd (VEX, 256-bit) fuses the pair multiply and the add. */
#include <immintrin.h>
#include <string.h>

#include "spill256.h"
#include "ukernel.h"

enum { MR = 6, NR = 16 };
DFP_CHECK_TILE(MR, NR);
#define VECTOR_BITS 256
#define V_DPWSSD _mm256_dpwssd_avx_epi32
#define V_SPILL dfp_spill256
#define V_ENCODE dfp_encode256
#define V_FOLD dfp_fold256
#define V_ANY(v) (!_mm256_testz_si256(v, v))
#define V_ENCODE_S32 dfp_encode256_s32
#include "ukernel_template.h"

const dfp_ukernel dfp_ukernel_avx_vnni = {MR, NR, ukernel, ukernel_f32, ukernel_f32_stream, ukernel_s32};
