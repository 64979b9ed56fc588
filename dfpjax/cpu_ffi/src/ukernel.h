/* The microkernel contract shared by all ISAs.
 *
 * Packed operands use the VNNI pair layout: an A micro-panel is [kpairs][MR][2] int16
 * (row i's pair k is one 32-bit word, broadcast by the kernel), a B micro-panel is
 * [kpairs][NR][2] int16 (NR 32-bit words per pair, loaded as vectors).
 *
 * The kernel adds A_panel x B_panel (kpairs <= DFP_KC_PAIRS) into the int64 tile
 * acc[i * ldc + j], i < MR, j < NR, or with add = 0 stores it there (a tile's first K block,
 * so that the macro-loops need not zero their accumulators). It accumulates in int32 lanes
 * for `chunk` pairs at a time; between chunks a lane may keep its low 16 bits and carry the
 * rest out (into int32 carries, each at most 2**15 a chunk). The caller guarantees (macro.h) that every partial
 * sum within a chunk stays within +-DFP_CHUNK_SUM_MAX = INT32_MAX - 0xffff, so a chunk that
 * starts from a carried remainder below 2**16 never leaves int32, which makes the result
 * exact. chunk = 1 is safe for any input with |m| <= 32767 (2 * 32767**2 < DFP_CHUNK_SUM_MAX).
 *
 * Where kpairs is the whole reduction (one K block), a path may also encode the tile straight
 * from its int32 lanes and carries (encode_f32): out[i * ldo + j] = the float32 bits of
 * fl(S_ij) * 2**k_i, given scale[i] = k_i << 23 with DFP_NORMAL_SCALE_MIN <= k_i <=
 * DFP_NORMAL_SCALE_MAX (encode.h), the same bits as the int64 tile through the output stage
 * (macro.h): S = carry * 2**16 + low is exact in double (|S| < 2**48), rounds once to float32,
 * and with such a k every nonzero |S| >= 1 lands on a normal float, so the scaling adds k to
 * the exponent field; zero stays +0. No int64 tile is written and read back, which is most of
 * a short reduction's output stage. NULL where a path has none (the macro-loops then take the
 * int64 tile). encode_f32_stream is encode_f32 with non-temporal stores, for outputs far larger
 * than the caches (macro.h): every row out + i * ldo is 64-byte aligned, and the caller fences
 * (sfence) before the output is read; NULL where encode_f32 is.
 * Where kpairs is the whole reduction, store_s32 stores the tile as int32 sums, out[i * ldo +
 * j], and returns 1 where every sum fits int32 (the lanes and carries fold into them), else 0
 * with nothing stored: half the stores of the int64 tile and no widening, for reductions so
 * short (col2im's K = 64) that those are a tenth of the tile's time. NULL on the portable path.
 * Each path's kernels are entries of its configuration (isa_config.h). */
#ifndef DFPJAX_UKERNEL_H_
#define DFPJAX_UKERNEL_H_

#include <stddef.h>
#include <stdint.h>

#include "dfp_kernel.h"

typedef void (*dfp_ukernel_fn)(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b,
                               int64_t* acc, size_t ldc, int add);

typedef int (*dfp_ukernel_s32_fn)(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int32_t* out,
                                  size_t ldo);

typedef void (*dfp_ukernel_f32_fn)(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b,
                                   uint32_t* out, size_t ldo, const int32_t* scale);

/* The largest register tile of any path (avx512_vnni's 8 x 32): the macro-loops' scratch for
 * one tile (macro.c). Each microkernel's file checks its tile against it. */
enum { DFP_TILE_MAX_ROWS = 8, DFP_TILE_MAX_ELEMENTS = 8 * 32 };
#define DFP_CHECK_TILE(mr, nr) \
  _Static_assert((int)(mr) <= (int)DFP_TILE_MAX_ROWS && (int)(mr) * (int)(nr) <= (int)DFP_TILE_MAX_ELEMENTS, \
                 "the tile exceeds DFP_TILE_MAX_ROWS or DFP_TILE_MAX_ELEMENTS")

/* A microkernel with its register tile: MR rows of A by NR columns of B. */
typedef struct {
  int mr, nr;
  dfp_ukernel_fn fn;
  dfp_ukernel_f32_fn encode_f32, encode_f32_stream;
  dfp_ukernel_s32_fn store_s32;
} dfp_ukernel;

/* A path's ukernel_f32 and ukernel_f32_stream from its always-inline
 * encode_tile(kpairs, chunk, a, b, out, ldo, scale, stream), one body for both stores. */
#define DFP_DEFINE_F32_ENCODERS(encode_tile)                                                              \
  static void ukernel_f32(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, uint32_t* out,  \
                          size_t ldo, const int32_t* scale) {                                              \
    encode_tile(kpairs, chunk, a, b, out, ldo, scale, 0);                                                  \
  }                                                                                                        \
  static void ukernel_f32_stream(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b,          \
                                 uint32_t* out, size_t ldo, const int32_t* scale) {                        \
    encode_tile(kpairs, chunk, a, b, out, ldo, scale, 1);                                                  \
  }

extern const dfp_ukernel dfp_ukernel_portable;
#if defined(DFPJAX_X86)
extern const dfp_ukernel dfp_ukernel_avx2;
extern const dfp_ukernel dfp_ukernel_avx_vnni;
extern const dfp_ukernel dfp_ukernel_avx512_vnni;
#endif

#endif
