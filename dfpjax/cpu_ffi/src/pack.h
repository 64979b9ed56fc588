/* Packing into the VNNI pair layout (see ukernel.h), with the norm summaries from which
 * macro.c proves int32 chunks safe. The loops are portable; the copies and the norm bounds
 * are entries of the path's configuration (isa_config.h): the portable ones here, the AVX2
 * ones in pack_avx2.c, the avx512_vnni path's in pack_avx512.c. */
#ifndef DFPJAX_PACK_H_
#define DFPJAX_PACK_H_

#include <stddef.h>
#include <stdint.h>

#include "isa_config.h"

enum {
  DFP_KC_PAIRS = 288,      /* the longest K block in pairs (dfp_kc_pairs) */
  DFP_SHORT_CHUNK_PAIRS = 2, /* the shortest chunk a bound is kept for: level l bounds chunks of 2 << l pairs */
  DFP_FINE_LEVELS = 2,     /* chunks of 2 and 4 pairs, bounded only where a tile asks (fine_bounds) */
  DFP_NORM_BLOCK_PAIRS = 8,/* the shortest chunk a path's norm_bounds bounds, at level DFP_FINE_LEVELS */
  DFP_NORM_LEVELS = 7,     /* chunks of 8, 16, ..., 512 pairs: the last level covers a whole block */
  DFP_CHUNK_LEVELS = DFP_FINE_LEVELS + DFP_NORM_LEVELS,
};

/* A fine level's bound before macro.c takes it: no bound, so it proves nothing. */
#define DFP_BOUND_UNTAKEN UINT64_MAX

/* Packs rows [row0, row0 + width) of a rows x k matrix whose element (r, c) is
 * src[r * row_stride + c * col_stride] (one of the strides is 1) into
 * dst[kpairs][width][2], zero padded. For each K block of kc pairs (dfp_kc_pairs) it writes
 * DFP_CHUNK_LEVELS bounds: bound[l] >= the largest squared norm of a panel row over one of
 * the block's chunks of DFP_SHORT_CHUNK_PAIRS << l pairs (chunks at multiples of their length),
 * the first DFP_FINE_LEVELS DFP_BOUND_UNTAKEN, the others the path's norm_bounds (the portable
 * path's exact, the AVX2 and AVX-512 ones at most 256 per pair above). Returns -1 if an element
 * is -32768 (outside the symmetric DFP range, where even one pair could overflow int32), else 0. */
int dfp_pack_panel(const dfp_isa_config* cfg, const int16_t* src, size_t rows, size_t k, size_t kc,
                   size_t row_stride, size_t col_stride, size_t row0, int width, int16_t* dst,
                   uint64_t* bounds);

/* dfp_pack_panel for `panels` consecutive panels, rows [row0, row0 + panels * width), panel q
 * at dst + q * panel_stride with its bounds at bounds + q * bounds_stride: each K block of
 * the source read once for all of them (dfp_pack_block). */
int dfp_pack_panels(const dfp_isa_config* cfg, const int16_t* src, size_t rows, size_t k, size_t kc,
                    size_t row_stride, size_t col_stride, size_t row0, int width, size_t panels,
                    int16_t* dst, size_t panel_stride, uint64_t* bounds, size_t bounds_stride);

/* Copies columns [c0, c1) (c0 even, c1 - c0 <= 2 * DFP_KC_PAIRS) of rows [0, valid) of such
 * a matrix into packed K blocks [pairs][width][2], row i into the one at dst + (i / width) *
 * panel_stride (so valid > width fills several panels in one pass over the source, which
 * matters where the rows are contiguous at fixed k): the whole pairs by the path's copy, an
 * odd last column here. Writes only the words of valid lanes, and of an odd last column only
 * the first half (with col_stride != 1): the caller zeroes dst where that leaves padding. */
void dfp_pack_block(const dfp_isa_config* cfg, const int16_t* src, size_t c0, size_t c1,
                    size_t row_stride, size_t col_stride, size_t valid, int width, int16_t* dst,
                    size_t panel_stride);

/* The bounds above for one packed K block dst[kpairs][width][2] (kpairs <= DFP_KC_PAIRS,
 * width <= 64); -1 if an element is -32768, else 0. For packers of other sources (im2col.c). */
int dfp_block_bounds(const dfp_isa_config* cfg, const int16_t* block, size_t kpairs, int width,
                     uint64_t* bounds);

/* The distance, in elements, between packed panels of `elements` each that are filled together
 * (pack_columns, and the taps view's packing in im2col.c, write every panel's lanes of a pair
 * before the next pair): one cache line
 * more, so that their write positions do not lie a multiple of 4 KB apart. Panels of 6 KB
 * (256 pairs x 6 lanes) or 16 KB (x 16) otherwise fall into one or two sets of an 8-way L1
 * (a set per 64-byte line of a 4 KB way), which 11-25 panels overflow on every pair: the
 * stem's and the 3x3 layers' backward-weights were 7-11% slower per kernel call on Zen 3. */
static inline size_t dfp_panel_stride(size_t elements) { return elements + 32; }

/* The K block of a reduction of kpairs pairs: as few blocks as DFP_KC_PAIRS allows, of equal
 * length rounded up to whole norm blocks (the last one shorter). A B micro-panel of
 * the block stays in L1 (AVX2: at most 18 KB). 288 = 9 taps x 64 channels / 2: a 3x3 window's
 * reduction over 64 channels (ResNet's 56x56 layers) is one block, each tile encoded as it is
 * computed, and over 128-512 channels whole blocks (blocks of 256 took those layers' forward and
 * backward-data 10% longer on Zen 3); a reduction of 512 pairs (K = 1024) two blocks of 256, not
 * 288 and 224 (the GEMM at 1024^3 3-5% slower). */
static inline size_t dfp_kc_pairs(size_t kpairs) {
  const size_t blocks = (kpairs + DFP_KC_PAIRS - 1) / DFP_KC_PAIRS;
  if (blocks <= 1) return DFP_KC_PAIRS;
  const size_t even = (kpairs + blocks - 1) / blocks;
  return (even + DFP_NORM_BLOCK_PAIRS - 1) / DFP_NORM_BLOCK_PAIRS * DFP_NORM_BLOCK_PAIRS;
}

/* The K blocks of kc pairs (dfp_kc_pairs) that a reduction of kpairs pairs takes. */
static inline size_t dfp_kc_blocks(size_t kpairs, size_t kc) {
  return (kpairs + kc - 1) / kc;
}

/* The configuration's packing entries. pack_rows: `pairs` pairs of each of the `valid` rows
 * src + i * row_stride (contiguous in k) into out[pair * width + i]. pack_columns: `pairs`
 * pairs of k-rows src + 2p * col_stride and src + (2p + 1) * col_stride, lanes [0, valid),
 * interleaved into panels of `width` lanes, lane i into out + (i / width) * panel_stride at
 * [(pair * width + i % width) * 2 + {0, 1}], each pair's k-rows read once for all panels; no
 * other word is written, so with valid <= width - l, out may be lane l of a panel (the
 * stem's window rows, cut at its panels' edges: im2col.c). interleave_pairs: n elements of
 * two rows as n pairs. norm_bounds: the DFP_NORM_LEVELS bounds of one packed K block from
 * DFP_NORM_BLOCK_PAIRS on (dfp_block_bounds' from level DFP_FINE_LEVELS); returns 1 if an
 * element is -32768. fine_bounds: the fine levels' DFP_FINE_LEVELS bounds of such a block,
 * at most 2 above the largest squared norms (a pair's squares are below 2**31 and two pairs'
 * below 2**32; four pairs' are kept in units of 2, each half rounded up), taken only for the
 * panels of a tile whose norm block's bound fails (macro.c). */
void dfp_pack_rows_portable(const int16_t* src, size_t pairs, size_t row_stride, size_t valid,
                            int width, uint32_t* out);
void dfp_pack_columns_portable(const int16_t* src, size_t pairs, size_t col_stride, size_t valid,
                               int width, int16_t* out, size_t panel_stride);
void dfp_interleave_pairs_portable(const int16_t* in0, const int16_t* in1, size_t n, int16_t* out);
int dfp_norm_bounds_portable(const int16_t* block, size_t kpairs, int width, uint64_t* bounds);
void dfp_fine_bounds_portable(const int16_t* block, size_t kpairs, int width, uint64_t* bounds);
void dfp_pack_rows_avx2(const int16_t* src, size_t pairs, size_t row_stride, size_t valid, int width,
                        uint32_t* out);
void dfp_pack_columns_avx2(const int16_t* src, size_t pairs, size_t col_stride, size_t valid, int width,
                           int16_t* out, size_t panel_stride);
void dfp_interleave_pairs_avx2(const int16_t* in0, const int16_t* in1, size_t n, int16_t* out);
int dfp_norm_bounds_avx2(const int16_t* block, size_t kpairs, int width, uint64_t* bounds);
void dfp_fine_bounds_avx2(const int16_t* block, size_t kpairs, int width, uint64_t* bounds);
void dfp_pack_columns_avx512(const int16_t* src, size_t pairs, size_t col_stride, size_t valid, int width,
                             int16_t* out, size_t panel_stride);
void dfp_pack_rows_avx512(const int16_t* src, size_t pairs, size_t row_stride, size_t valid, int width,
                          uint32_t* out);
int dfp_norm_bounds_avx512(const int16_t* block, size_t kpairs, int width, uint64_t* bounds);

/* The column copies (pack_columns) go pair by pair, all the panels' lanes of its two k-rows,
 * reading the rows in order, once, each prefetched DFP_PREFETCH_PAIRS pairs ahead: a k-row of a
 * dense 1x1 taps view is a pixel of x (256-512 bytes apart), too short a stream for the
 * hardware prefetcher, and without the prefetch the copy waits on each load, one pair at a
 * time. That distance into L1 leaves the copy waiting on memory still where a pair is a few
 * cache lines and each is read from DRAM (the 56x56 layers' x and dy, 51 MB at batch 32):
 * the lines are asked for into L2 too, DFP_PREFETCH_L2_PAIRS pairs ahead (Zen 4, two threads:
 * the 56x56 1x1 layers' backward-weights kernels 4-10% shorter, on its avx2 path too; 24 pairs
 * ahead gained less, 48 and 72 no more). The lines of lanes [0, lanes) of the k-rows of the
 * pairs that many after the one at in0 (addresses as integers: prefetches past the source are
 * harmless, they never fault). */
enum { DFP_PREFETCH_PAIRS = 8, DFP_PREFETCH_L2_PAIRS = 32 };
static inline void dfp_prefetch_pair_ahead(const int16_t* in0, size_t col_stride, size_t lanes) {
  const size_t row = col_stride * sizeof(int16_t);
  const uintptr_t ahead = (uintptr_t)in0 + DFP_PREFETCH_PAIRS * 2 * row;
  const uintptr_t far = (uintptr_t)in0 + DFP_PREFETCH_L2_PAIRS * 2 * row;
  for (size_t byte = 0; byte < lanes * 2 + 64; byte += 64) {
    __builtin_prefetch((const void*)(ahead + byte), 0, 3);
    __builtin_prefetch((const void*)(ahead + row + byte), 0, 3);
    __builtin_prefetch((const void*)(far + byte), 0, 2);
    __builtin_prefetch((const void*)(far + row + byte), 0, 2);
  }
}

/* A path's fold of one lane group's norm block sums into the levels, for its vector type
 * (pack_avx2.c's and pack_avx512.c's): each level's largest over chunks and rows into top, then
 * chunks of two of the level below, an odd last chunk carried up as it is. */
#define DFP_DEFINE_FOLD_LEVELS(name, vec, max_epu32, add_epi32)                                     \
  static inline void name(vec* chunk, size_t count, vec* top) {                                     \
    for (int level = 0; level < DFP_NORM_LEVELS; ++level) {                                         \
      for (size_t b = 0; b < count; ++b) top[level] = max_epu32(top[level], chunk[b]);              \
      for (size_t b = 0; b < count / 2; ++b) chunk[b] = add_epi32(chunk[2 * b], chunk[2 * b + 1]);  \
      if (count & 1) chunk[count / 2] = chunk[count - 1];                                           \
      count = (count + 1) / 2;                                                                      \
    }                                                                                               \
  }

/* What the AVX2 row copy leaves to plain C: pairs [first, pairs) of pack_rows. */
void dfp_pack_rows_from(const int16_t* src, size_t first, size_t pairs, size_t row_stride,
                        size_t valid, int width, uint32_t* out);

#endif
