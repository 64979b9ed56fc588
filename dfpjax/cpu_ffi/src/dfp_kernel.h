/* dfpjax CPU kernel: exact INT16 x INT16 -> float matrix products (docs/numerics.md), and
 * the per-channel float sums around them (BatchNorm's statistics).
 *
 * Portable C API used by the XLA FFI binding (ffi_binding.cc). Layout of the
 * implementation, BLIS style, with an XNNPACK-style per-ISA configuration:
 *   isa_config.h, isa.c the per-ISA table of function pointers (microkernel and MR x NR,
 *                       packing copies, norm bounds, float32 output stage, quantization
 *                       rows, col2im's int64 adds, channel sums' rows), CPU feature detection
 *                       and the DFPJAX_ISA override
 *   gemm.c, conv.c      macro-loops: blocking, threading, packing (portable)
 *   macro.c             what the macro-loops share: the block routine (chunk bound ->
 *                       microkernel), the output stage, per-thread scratch, the task
 *                       error record
 *   pack.c, im2col.c    packing into the VNNI pair layout + per-block norms; implicit
 *                       im2col of convolution inputs (portable)
 *   quantize.c          float -> INT16 DFP operands (portable rows and driver)
 *   channel_sums.c      per-channel float sums in double (portable rows and driver)
 *   *_avx2.c            the AVX2 entries: pack_avx2.c, encode_avx2.c, quantize_avx2.c,
 *                       channel_sums_avx2.c
 *   *_avx512.c          the avx512_vnni path's own column copy, output stage, col2im run
 *                       adds and quantization rows: pack_avx512.c, encode_avx512.c,
 *                       quantize_avx512.c
 *   ukernel_*.c         one register-blocked microkernel per ISA, the x86 ones from one
 *                       template (ukernel_template.h; spill256.h: the INT64 spill the
 *                       two 256-bit ones share)
 *   vnni_emulation.h    verification builds only: the VNNI intrinsics emulated (SIMDe)
 *   encode.h            exact int64 -> float rounding and power-of-two scaling
 */
#ifndef DFPJAX_DFP_KERNEL_H_
#define DFPJAX_DFP_KERNEL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The functions of this header and the FFI handlers (ffi_binding.cc) are the library's only
 * exported symbols; CMakeLists.txt builds the rest hidden, so that nothing inside can be
 * interposed: two builds in one process (benchmarks/conv_phases.c --against) each keep their
 * own packing and microkernel entries, and the calls between the files bind directly. */
#define DFP_API __attribute__((visibility("default")))

typedef enum {
  DFP_ISA_PORTABLE = 0,
  DFP_ISA_AVX2 = 1,
  DFP_ISA_AVX_VNNI = 2,
  DFP_ISA_AVX512_VNNI = 3,
  DFP_ISA_COUNT = 4,
} dfp_isa;

/* The output's element type. DFP_OUT_S64 writes the exact int64 sums unrounded and unscaled
 * (the exponents are not read): a product split over devices adds its parts' sums exactly
 * before it rounds once. DFP_OUT_SPLIT_U8 / DFP_OUT_SPLIT_U16 write each exact sum s in two
 * narrower parts, also unscaled: the high part s >> low_bits (floor) as int32, and the low
 * part s - (high << low_bits), in [0, 2**low_bits), as uint8 / uint16; s = high * 2**low_bits
 * + low. Devices can add the parts separately where the caller's bound keeps the parts' sums
 * within their types (fewer bytes to write and to add than int64). */
typedef enum {
  DFP_OUT_F32 = 0,
  DFP_OUT_BF16 = 1,
  DFP_OUT_F16 = 2,
  DFP_OUT_S64 = 3,
  DFP_OUT_SPLIT_U8 = 4,
  DFP_OUT_SPLIT_U16 = 5,
} dfp_out_format;

/* Where a product writes its result: data, elements of format (the high parts of split sums);
 * for the split formats also low, the low parts, of low_bits bits each (at most 8 / 16). The
 * call fails with DFP_ERR_BAD_SHAPE where the high part of a sum of its length could leave
 * int32 (|m| <= 32767 bounds each term). */
typedef struct {
  void* data;
  dfp_out_format format;
  void* low;
  int low_bits;
} dfp_output;

/* Runs task(arg, i) for i in [0, n) on a thread pool and returns when all are done. */
typedef void (*dfp_task_fn)(void* arg, size_t i);
typedef struct {
  void (*parallel_for)(void* pool, size_t n, dfp_task_fn task, void* arg);
  void* pool;
  int num_threads;
} dfp_parallel;

/* out[b, m, n] = fl(sum_k A[b, m, k] * B[b, k, n]) * 2**(ea[b, m] + eb[b, n]), exactly.
 * A is [batch, M, K] (a_kmajor = 0) or [batch, K, M] (a_kmajor = 1), dense row-major;
 * B is [batch, K, N] (b_nmajor = 0) or [batch, N, K] (b_nmajor = 1). Exponents are
 * indexed with the given strides (0 broadcasts); INT32_MAX marks a non-finite operand
 * and makes the whole output NaN. Mantissas must satisfy |m| <= 32767. */
typedef struct {
  size_t batch, m, n, k;
  const int16_t* a;
  int a_kmajor;
  const int16_t* b;
  int b_nmajor;
  const int32_t* ea;
  size_t ea_batch_stride, ea_stride;
  const int32_t* eb;
  size_t eb_batch_stride, eb_stride;
  dfp_output out;
} dfp_gemm_args;

/* 0 on success, else a negative dfp_status (ffi_binding.cc gives each its own message). */
enum {
  DFP_OK = 0,
  DFP_ERR_ISA_UNSUPPORTED = -1,  /* the path is not compiled in or this CPU cannot run it */
  DFP_ERR_ALLOC = -2,            /* out of memory */
  DFP_ERR_BAD_MANTISSA = -3,     /* a mantissa is -32768 */
  DFP_ERR_BAD_SHAPE = -4,        /* invalid geometry or quantization parameters */
};

DFP_API int dfp_gemm(const dfp_gemm_args* args, dfp_isa isa, const dfp_parallel* par);

/* Geometry of a channels-last convolution with up to 3 spatial dimensions (unused ones
 * have size 1 and unit parameters) and feature groups:
 *   x [batch][in0][in1][in2][groups * cin]      the input
 *   w [win0][win1][win2][cin][groups * cout]    the weights
 *   y [batch][out0][out1][out2][groups * cout]  the output
 * Tap t of output pixel p reads coordinate u = p * stride + t * rhs_dil - pad_lo of the
 * lhs-dilated input, which holds x[u / lhs_dil] where lhs_dil divides u and zero elsewhere
 * (as lax.conv_general_dilated; pad_lo may be negative). */
typedef struct {
  size_t batch, in[3], out[3], window[3];
  int64_t stride[3], pad_lo[3], lhs_dil[3], rhs_dil[3];
  size_t groups, cin, cout;
} dfp_conv_shape;

/* How the forward convolution's b holds its weights w[t][c][g * cout + o]: tap t (per
 * dimension) is b's tap tap_first + tap_step * t (tap_step < 0 flips it) of b's window, and
 * b is [window][cin][groups * cout] as w, or with transposed = 1 [window][cout][groups * cin],
 * w[t][c][g * cout + o] = b[t'][o][g * cin + c]: the weights of the convolution this one is
 * the backward-data of, read in place (no flipped copy). With features_major = 1 b's last
 * dimension is its outermost in memory (b lies as [last][window][second to last], the layout in
 * which an all-gather along the last dimension writes it). With mapped = 0 (a zeroed view) b is
 * w as it lies and the other fields are unread. */
typedef struct {
  int mapped, transposed, features_major;
  size_t window[3];
  int64_t tap_first[3], tap_step[3];
} dfp_weight_view;

/* dfp_conv_forward:          out = y  from x and the w that b holds (weights), exactly
 *                            (spec section 3);
 * dfp_conv_backward_weights: out = dw[t][c][g * cout + o] = sum over batch and output pixels
 *                            of x[n][u(p, t)][g * cin + c] * b[n][p][g * cout + o], b = dy;
 * dfp_conv_backward_data:    out = dx, the transposed convolution of x = dy (shaped like y)
 *                            with b = w: dx[n][u(p, t)][g * cin + c] sums dy[n][p][g * cout + o]
 *                            * w[t][c][g * cout + o] over o, t and the p whose tap t reads it.
 * The output is scaled by 2**(ex[n * ex_batch_stride] + eb) (the backward passes need one
 * exponent: ex_batch_stride must be 0 there). Mantissas must satisfy |m| <= 32767. */
typedef struct {
  dfp_conv_shape shape;
  dfp_weight_view weights; /* forward; backward-data reads only its features_major */
  const int16_t* x;
  const int32_t* ex;
  size_t ex_batch_stride;
  const int16_t* b;
  int32_t eb;
  dfp_output out;
} dfp_conv_args;

DFP_API int dfp_conv_forward(const dfp_conv_args* args, dfp_isa isa, const dfp_parallel* par);
DFP_API int dfp_conv_backward_weights(const dfp_conv_args* args, dfp_isa isa, const dfp_parallel* par);
DFP_API int dfp_conv_backward_data(const dfp_conv_args* args, dfp_isa isa, const dfp_parallel* par);

/* Spec section 2 for float32, one exponent per group, round half to even: x and m are
 * [groups][n]; e[g] = floor(log2(amax of group g)) - (bits - 2) + headroom, 0 for an
 * all-zero group, DFP_NONFINITE_EXPONENT for one holding NaN or Inf (its m all 0);
 * m = saturate(R(x * 2**-e)) with |m| <= 2**(bits - 1) - 1. Integer-only, so it is exact
 * under any floating-point mode. bits in [2, 16], headroom in [0, bits - 2].
 * group_max, if not NULL, gives each group's amax as its magnitude bit pattern (sign bit
 * clear; above 0x7f800000 for a NaN), e.g. the max over every shard of a group that x holds
 * one shard of: e[g] comes from it and the kernel only forms mantissas (one pass). It must
 * bound the group's magnitudes in x. */
typedef struct {
  size_t groups, n;
  const float* x;
  int bits, headroom;
  int16_t* m;
  int32_t* e;
  const uint32_t* group_max;
} dfp_quantize_args;

DFP_API int dfp_quantize(const dfp_quantize_args* args, dfp_isa isa, const dfp_parallel* par);

/* top[g] = the largest magnitude bit pattern (the float's bits & 0x7fffffff) of group g of
 * x [groups][n], 0 for an empty group: the group_max of dfp_quantize_args, read in one pass. */
DFP_API int dfp_max_magnitudes(const float* x, size_t groups, size_t n, uint32_t* top, dfp_isa isa,
                       const dfp_parallel* par);

/* Per-channel sums of float32 operands a, b [groups][rows][channels] and center
 * [groups][channels], in one read of each: sum[g][c] = sum over r of a[g][r][c], and
 * dot[g][c] = the sum of a[g][r][c] * (b[g][r][c] - center[g][c]) (the difference rounded to
 * float32). The terms are added in double, in an order set by the shape alone, and each result
 * rounded to float32 once: the same bits on every path and thread count. a and b may be the same
 * array (sum of squares). */
typedef struct {
  size_t groups, rows, channels;
  const float *a, *b, *center;
  float *sum, *dot;
} dfp_channel_sums_args;

DFP_API int dfp_channel_sums(const dfp_channel_sums_args* args, dfp_isa isa, const dfp_parallel* par);

DFP_API int dfp_isa_supported(dfp_isa isa);       /* compiled in and runnable on this CPU */
DFP_API int dfp_isa_emulated(dfp_isa isa);        /* built on emulated intrinsics (DFPJAX_EMULATE_VNNI) */
DFP_API const char* dfp_isa_name(dfp_isa isa);    /* "portable", "avx2", "avx_vnni", "avx512_vnni" */
DFP_API dfp_isa dfp_best_isa(void);               /* the fastest supported path that is not emulated */
/* The microkernel's register tile of a path compiled into this build: 0 and *mr x *nr, else -1. */
DFP_API int dfp_isa_tile(dfp_isa isa, int* mr, int* nr);
/* The path a call uses: DFPJAX_ISA if set (>= 0), else the best; -1 if DFPJAX_ISA names
 * an unknown path. */
DFP_API int dfp_selected_isa(void);

#ifdef __cplusplus
}
#endif
#endif
