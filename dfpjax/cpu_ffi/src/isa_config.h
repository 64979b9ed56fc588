/* The per-ISA configuration, XNNPACK style: everything a kernel path brings of its own, as
 * function pointers chosen once per call (isa.c) and passed down to the portable macro-loops,
 * which never ask which ISA they run on. The portable path's entries are plain C, so forcing
 * it runs, and tests, what a CPU without AVX2 would run; the x86 paths share the AVX2 helpers
 * (pack_avx2.c, encode_avx2.c, quantize_avx2.c) and differ in their microkernels, but for the
 * avx512_vnni path's copies, B panels' norm bounds, output stage, run adds and quantization rows
 * (pack_avx512.c, encode_avx512.c, quantize_avx512.c). */
#ifndef DFPJAX_ISA_CONFIG_H_
#define DFPJAX_ISA_CONFIG_H_

#include <stddef.h>
#include <stdint.h>

#include "dfp_kernel.h"
#include "ukernel.h"

typedef struct {
  /* The microkernel and its MR x NR tile (ukernel.h). */
  const dfp_ukernel* ukernel;
  /* Packing (pack.h): the whole pairs of a K block of a panel whose rows are contiguous in k,
   * or of the panels whose rows are contiguous at fixed k. */
  void (*pack_rows)(const int16_t* src, size_t pairs, size_t row_stride, size_t valid, int width,
                    uint32_t* out);
  void (*pack_columns)(const int16_t* src, size_t pairs, size_t col_stride, size_t valid, int width,
                       int16_t* out, size_t panel_stride);
  /* Two rows' elements as pairs, out[2i] = in0[i] and out[2i + 1] = in1[i] for i < n (pack.h):
   * the taps view's two pixels of a pair (im2col.c). */
  void (*interleave_pairs)(const int16_t* in0, const int16_t* in1, size_t n, int16_t* out);
  /* The bounds of a packed K block: its norm levels, and its fine levels where a tile asks (pack.h). */
  int (*norm_bounds)(const int16_t* block, size_t kpairs, int width, uint64_t* bounds);
  void (*fine_bounds)(const int16_t* block, size_t kpairs, int width, uint64_t* bounds);
  /* The float32 output stage of one row (macro.h). */
  void (*encode_f32)(const int64_t* s, size_t n, int32_t ea, const int32_t* eb, size_t eb_stride,
                     uint32_t* out);
  /* Quantization rows (quantize.h). */
  uint32_t (*max_magnitude)(const float* x, size_t n);
  uint32_t (*quantize_row)(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream);
  /* dst[offsets[r] + j] += src[r * n + j] for r < runs, j < n, int64: the units of col2im's
   * columns of one output pixel into the input pixels they read (conv.c, macro.h). */
  void (*add_runs)(int64_t* dst, const size_t* offsets, const int64_t* src, size_t n, size_t runs);
  /* add_runs from int32 sums (dfp_multiply_block_s32's); NULL where the path's microkernel has
   * no store_s32 (ukernel.h): its col2im takes the int64 sums. The AVX2 adds on every x86 path. */
  void (*add_runs_s32)(int64_t* dst, const size_t* offsets, const int32_t* src, size_t n, size_t runs);
  /* The split sums' output stage of one row (macro.h): high[j] = s[j] >> low_bits and low[j] =
   * s[j] mod 2**low_bits in low_bytes (1 or 2) bytes. */
  void (*split_sums)(const int64_t* s, size_t n, int low_bits, int low_bytes, uint32_t* high, void* low);
  /* Per-channel float sums of rows, in double (channel_sums.h). */
  void (*channel_sums_rows)(const float* a, const float* b, const float* center, size_t rows,
                            size_t channels, size_t stride, double* sum, double* dot);
  /* A streamed output's rows through a strip in the cache (macro.c): rows x cols float32 (cols a
   * multiple of 16) from src [rows][cols] to dst + r * ldo, 64-byte aligned, by non-temporal
   * stores. NULL where the path's tiles stream their rows themselves (encode_f32_stream). */
  void (*stream_rows)(const uint32_t* src, size_t rows, size_t cols, uint32_t* dst, size_t ldo);
} dfp_isa_config;

/* The configuration of a path compiled into this build, else NULL (an unknown index, or an
 * x86 path on another host). Whether the CPU runs it is dfp_isa_supported's question. */
const dfp_isa_config* dfp_isa_config_for(dfp_isa isa);

#endif
