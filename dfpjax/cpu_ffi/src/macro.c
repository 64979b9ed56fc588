#include "macro.h"

#include "encode.h"
#include "pack.h"

/* By Cauchy-Schwarz |sum_k a_k b_k| <= ||a|| ||b||, and a row's squared norm over a chunk
 * is at most the bound of its level. Returns 1 (always safe: one pair is at most
 * 2 * 32767^2 < DFP_CHUNK_SUM_MAX) when not even the shortest level is proven safe. */
size_t dfp_safe_chunk(const uint64_t* abound, const uint64_t* bbound) {
  const unsigned __int128 limit = (unsigned __int128)DFP_CHUNK_SUM_MAX * DFP_CHUNK_SUM_MAX;
  size_t chunk = 1;
  for (int level = 0; level < DFP_CHUNK_LEVELS; ++level) {
    if ((unsigned __int128)abound[level] * bbound[level] > limit) break;
    chunk = (size_t)DFP_NORM_BLOCK_PAIRS << level;
  }
  return chunk;
}

#if defined(DFPJAX_X86)
void dfp_encode_row_f32_avx2(const int64_t* s, size_t n, int32_t ea, const int32_t* eb,
                             size_t eb_stride, uint32_t* out);
#endif

static void encode_row_f32(const int64_t* s, size_t n, int32_t ea, const int32_t* eb,
                           size_t eb_stride, uint32_t* out, int avx2) {
#if defined(DFPJAX_X86)
  if (avx2) {
    dfp_encode_row_f32_avx2(s, n, ea, eb, eb_stride, out);
    return;
  }
#else
  (void)avx2;
#endif
  for (size_t j = 0; j < n; ++j) out[j] = dfp_encode_f32(s[j], ea, eb[j * eb_stride]);
}

void dfp_encode_row(dfp_out_format format, void* out, size_t out_index, const int64_t* s, size_t n,
                    int32_t ea, const int32_t* eb, size_t eb_stride, int avx2) {
  if (format == DFP_OUT_F32) {
    encode_row_f32(s, n, ea, eb, eb_stride, (uint32_t*)out + out_index, avx2);
    return;
  }
  const int bf16 = format == DFP_OUT_BF16;
  uint16_t* o = (uint16_t*)out + out_index;
  for (size_t j = 0; j < n; ++j) {
    const int32_t e = eb[j * eb_stride];
    o[j] = (ea == DFP_NONFINITE_EXPONENT || e == DFP_NONFINITE_EXPONENT)
               ? (bf16 ? 0x7fc0 : 0x7e00)
               : (uint16_t)dfp_encode_scaled(s[j], ea + e, bf16 ? &kDfpBF16 : &kDfpF16);
  }
}

static void serial_for(void* pool, size_t n, dfp_task_fn task, void* arg) {
  (void)pool;
  for (size_t i = 0; i < n; ++i) task(arg, i);
}

const dfp_parallel dfp_serial = {serial_for, NULL, 1};
