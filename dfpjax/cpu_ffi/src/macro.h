/* What the macro-loops of the GEMM (gemm.c) and the convolutions (conv.c) share: the block
 * routine (exact int32 chunk bound -> microkernel, which carries between chunks; for one K
 * block, its variant that encodes each tile as it is computed), the output stage, the tasks'
 * per-thread scratch buffers, the error record of parallel tasks, and the serial fallback for a
 * missing thread pool.
 *
 * Block sizes are named <SCOPE>_<BLOCK>_<UNIT>: DFP_KC_PAIRS (pack.h) for the longest K block
 * (each product's own from dfp_kc_pairs), GEMM_MC_ROWS / GEMM_NC_COLS and CONV_MC_ROWS /
 * CONV_NC_COLS for the cache blocks. */
#ifndef DFPJAX_MACRO_H_
#define DFPJAX_MACRO_H_

#include <stddef.h>
#include <stdint.h>

#include "dfp_kernel.h"
#include "isa_config.h"

/* Columns of a convolution's cache block (conv.c): its forward pass packs each block of A once
 * where N is at most this, which is where gemm.c runs a large product as a convolution. */
enum { CONV_NC_COLS = 256 };

/* The largest partial sum a chunk may reach (ukernel.h): int32 less a carried remainder. */
#define DFP_CHUNK_SUM_MAX (INT32_MAX - 0xffff)

/* Packed micro-panels over one K block of kpairs <= DFP_KC_PAIRS pairs: A panel i at
 * a + i * a_stride with its DFP_CHUNK_LEVELS bounds at abound + i * abound_stride, and the
 * same for B panel j. The block routines take a panel's fine levels (pack.h) into its bounds
 * where a tile asks, so several tasks may share a panel's bounds but must not copy them. */
typedef struct {
  const int16_t* a;
  size_t a_stride, mpanels;
  uint64_t* abound;
  size_t abound_stride;
  const int16_t* b;
  size_t b_stride, npanels;
  uint64_t* bbound;
  size_t bbound_stride;
  size_t kpairs;
} dfp_block;

/* The block routine: tile (i, j) of acc, at acc + i * MR * ldc + j * NR, gets A panel i x
 * B panel j added (add = 1) or stored (add = 0), exactly, each tile with the longest chunk its
 * panels' bounds prove safe. */
void dfp_multiply_block(const dfp_isa_config* cfg, const dfp_block* block, int64_t* acc, size_t ldc, int add);

/* dfp_multiply_block for one K block (block->kpairs the whole reduction) into int32 sums, tile
 * (i, j) at out + i * MR * ldo + j * NR, on a path with store_s32 (ukernel.h), each tile with the
 * chunk its bounds prove. Returns 0 where a sum does not fit int32 (out is then partly written:
 * the caller takes the int64 route), else 1. */
int dfp_multiply_block_s32(const dfp_isa_config* cfg, const dfp_block* block, int32_t* out, size_t ldo);

static inline int dfp_out_is_split(dfp_out_format format) {
  return format == DFP_OUT_SPLIT_U8 || format == DFP_OUT_SPLIT_U16;
}

/* The bytes of one low part of a split format. */
static inline int dfp_out_low_bytes(dfp_out_format format) { return format == DFP_OUT_SPLIT_U8 ? 1 : 2; }

/* Whether a cache block over one K block writes its tiles into the output as they are
 * computed (dfp_multiply_encode_block): a float32 output with one exponent per row (eb_stride
 * 0), on a path whose microkernel encodes from its lanes; or the sums of a product whose
 * contracted dimension is split over devices (int64, stored as they are, or split in two
 * parts). Otherwise the int64 block of sums and the output stage are as fast or faster
 * (per-column exponents: 4-23% slower tile by tile). */
static inline int dfp_encodes_tiles(const dfp_isa_config* cfg, dfp_out_format format, size_t eb_stride) {
  return format == DFP_OUT_S64 || dfp_out_is_split(format) ||
         (cfg->ukernel->encode_f32 != NULL && format == DFP_OUT_F32 && eb_stride == 0);
}

/* DFP_OK where out can hold every sum of `terms` products of mantissas (|m| <= 32767): any
 * format but a split one, or a split one whose low_bits fit its low type and whose high parts
 * fit int32; else DFP_ERR_BAD_SHAPE. */
int dfp_check_output(const dfp_output* out, uint64_t terms);

/* Outputs of at least this many bytes are written with non-temporal stores where the path has
 * them and the rows are aligned: a product's float32 tiles (ukernel.h's encode_f32_stream) and
 * the quantization's mantissas (quantize.h). Such an output is several times a core's L2 and,
 * on a shared machine, more L3 than two threads can count on keeping until it is read, so a
 * normal store's read of each line first (and its eviction of useful lines) buys little, and a
 * short reduction stalls on those reads. On a Zen 4, 2 threads: the forward kernels of the 1x1
 * layers with 51-103 MB outputs took 25-30% less time, the quantization of 103 MB of floats
 * 20-25%; this threshold against 32 MiB, conv.py's passes 2-8% less, a 25.7 MB output's layer
 * 15-30%, with its BatchNorm reading the output in the same step too (docs/performance.md). */
#define DFP_STREAM_OUTPUT_BYTES ((size_t)8 << 20)

/* Whether an output of `bytes` is that large (dfp_block_output's stream, quantize.c's). */
static inline int dfp_stream_output(size_t bytes) { return bytes >= DFP_STREAM_OUTPUT_BYTES; }

/* Where such a block's tiles go: its (0, 0) is element index of out (row stride ldo),
 * rows x cols of it are valid (the rest of its panels is padding), row r's exponent is ea[r],
 * every column's eb (float32 only); stream: the whole output has DFP_STREAM_OUTPUT_BYTES or
 * more. */
typedef struct {
  const dfp_output* out;
  size_t index, ldo, rows, cols;
  const int32_t* ea;
  int32_t eb;
  int stream;
} dfp_block_output;

/* dfp_multiply_block over the whole reduction (block->kpairs pairs) where dfp_encodes_tiles,
 * each tile written into the output as soon as it is computed, with no int64 block of sums:
 * int64 sums stored by the microkernel in place (through an int64 tile where the tile is
 * partial); float32 straight from the microkernel's lanes (its encode_f32, or
 * encode_f32_stream for a streamed output, fenced before it returns; for a streamed block of
 * STRIP_MIN_COLS columns or more, where the path has stream_rows, encode_f32 into a strip of the
 * A panel's rows that stream_rows writes out, macro.c) where the tile is whole and its rows'
 * scales normal, else through an int64 tile and the output stage; split sums through an int64
 * tile and the split stage. */
void dfp_multiply_encode_block(const dfp_isa_config* cfg, const dfp_block* block, const dfp_block_output* out);

/* out[out_index + j] = fl(s[j]) * 2**(ea + eb[j * eb_stride]) for j < n, in the output
 * format; NaN where an exponent marks a non-finite operand (spec sections 2 and 3). Any
 * exponents give the exact result: the sum is never formed in int32. DFP_OUT_S64: s[j]; the
 * split formats: s[j]'s two parts. */
void dfp_encode_row(const dfp_isa_config* cfg, const dfp_output* out, size_t out_index,
                    const int64_t* s, size_t n, int32_t ea, const int32_t* eb, size_t eb_stride);

/* The configuration's float32 output stage (isa_config.h): the scalar specification, the
 * AVX2 version (encode_avx2.c) and the avx512_vnni path's (encode_avx512.c). */
void dfp_encode_f32_portable(const int64_t* s, size_t n, int32_t ea, const int32_t* eb,
                             size_t eb_stride, uint32_t* out);
void dfp_encode_f32_avx2(const int64_t* s, size_t n, int32_t ea, const int32_t* eb,
                         size_t eb_stride, uint32_t* out);
void dfp_encode_f32_avx512(const int64_t* s, size_t n, int32_t ea, const int32_t* eb,
                           size_t eb_stride, uint32_t* out);

/* The configuration's int64 run adds (isa_config.h): plain C, AVX2 (encode_avx2.c) and the
 * avx512_vnni path's (encode_avx512.c). */
void dfp_add_runs_portable(int64_t* dst, const size_t* offsets, const int64_t* src, size_t n, size_t runs);
void dfp_add_runs_avx2(int64_t* dst, const size_t* offsets, const int64_t* src, size_t n, size_t runs);
void dfp_add_runs_avx512(int64_t* dst, const size_t* offsets, const int64_t* src, size_t n, size_t runs);
void dfp_add_runs_s32_avx2(int64_t* dst, const size_t* offsets, const int32_t* src, size_t n, size_t runs);

/* The AVX2 paths' stream_rows (isa_config.h, encode_avx2.c): 32-byte non-temporal stores. */
void dfp_stream_rows_avx2(const uint32_t* src, size_t rows, size_t cols, uint32_t* dst, size_t ldo);

/* The configuration's split-sums stage (isa_config.h): plain C and AVX2 (encode_avx2.c). The
 * high parts fit int32 (dfp_check_output) and low_bits <= 16, so the low 32 bits of the
 * logical shift are the arithmetic shift's (AVX2 has no 64-bit arithmetic shift). */
void dfp_split_sums_portable(const int64_t* s, size_t n, int low_bits, int low_bytes, uint32_t* high, void* low);
void dfp_split_sums_avx2(const int64_t* s, size_t n, int low_bits, int low_bytes, uint32_t* high, void* low);

/* Outputs of at least this many bytes (two huge pages, so at least one lies inside) are often
 * fresh memory, page-faulted in 4 KB at a time as the kernel writes them: glibc maps a block
 * of 32 MB or more afresh on every allocation, and in a jitted step every output lies in XLA's
 * temporary block, which is one such allocation per step (ResNet-50 DFP at batch 16 with the
 * threshold at 32 MB: 157,000 faults a step; at 4 MB: 116,000, docs/performance.md). */
#define DFP_HUGE_OUTPUT_BYTES ((size_t)4 << 20)

/* Asks the OS to back the 2 MB-aligned interior of an output of DFP_HUGE_OUTPUT_BYTES or more
 * with transparent huge pages (Linux, THP in "madvise" mode or "always"): a 103 MB output then
 * takes about 50 page faults instead of 25,000. Only a hint, on memory the caller is about to
 * overwrite whole: it changes no result and adds no resident pages to the output (on a block
 * glibc reuses, the heap keeps the advice). Ignored elsewhere and when it fails. */
void dfp_advise_output(void* out, size_t bytes);

/* Scratch buffers of a parallel task (packed A panels and their bounds, B panels, a block's
 * int64 sums, a row strip), one per slot. Taken from the heap for every task, they were a forward 56x56 layer's 1,521
 * allocations of 67 KB a call; with glibc's single arena (MALLOC_ARENA_MAX=1, the trainer's
 * settings in docs/examples.md) shared by every device's thread and by XLA's buffers, those
 * allocations cost ~6% of the 4-device sharded step's CPU time (docs/performance.md). */
typedef enum {
  DFP_SCRATCH_A_PANELS,
  DFP_SCRATCH_A_BOUNDS,
  DFP_SCRATCH_B_PANELS, /* a backward-weights task's own packed K block of dy, with its bounds (conv.c) */
  DFP_SCRATCH_SUMS,
  DFP_SCRATCH_ROW_STRIP, /* a streamed block's float32 rows of one A panel (macro.c) */
  DFP_SCRATCH_SLOTS
} dfp_scratch_slot;

/* At least bytes of 64-byte aligned memory for slot, owned by the calling thread: kept from
 * task to task and call to call, grown when too small (its contents then lost), freed when
 * the thread exits. Contents are undefined. A task runs to completion on its thread and
 * never runs another inside it, so each slot has one user at a time. NULL when out of memory. */
void* dfp_scratch(dfp_scratch_slot slot, size_t bytes);

/* The bytes of one element of an output's data (the high parts of split sums). */
static inline size_t dfp_out_element_bytes(dfp_out_format format) {
  return format == DFP_OUT_F32 || dfp_out_is_split(format) ? 4 : format == DFP_OUT_S64 ? 8 : 2;
}

/* Records a parallel task's error in *status (a negative dfp_status); of several concurrent
 * ones any one is kept. */
static inline void dfp_fail(int* status, int code) { __atomic_store_n(status, code, __ATOMIC_RELAXED); }

/* parallel_for over the calling thread alone. */
extern const dfp_parallel dfp_serial;

/* The set-up every plan (GEMM, convolutions) starts with: *cfg the configuration for isa, *mr x
 * *nr its microkernel's tile, *par the serial fallback when NULL. DFP_ERR_ISA_UNSUPPORTED when
 * this CPU cannot run isa, else DFP_OK. */
int dfp_plan_init(dfp_isa isa, const dfp_parallel** par, const dfp_isa_config** cfg, int* mr, int* nr);

#endif
