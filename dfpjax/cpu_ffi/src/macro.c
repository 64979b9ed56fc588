#include "macro.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(DFPJAX_X86)
#include <immintrin.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include "encode.h"
#include "pack.h"

/* Whether bounds a and b on two vectors' squared norms keep their product within
 * +-DFP_CHUNK_SUM_MAX (Cauchy-Schwarz). */
static inline int proves(uint64_t a, uint64_t b) {
  return (unsigned __int128)a * b <= (unsigned __int128)DFP_CHUNK_SUM_MAX * DFP_CHUNK_SUM_MAX;
}

/* A panel's fine levels (pack.h's fine_bounds), taken once: tasks sharing the panel may take
 * them at once, each storing the same values; one that reads a level still DFP_BOUND_UNTAKEN
 * proves nothing with it, so the stores need no order. */
static void take_fine_bounds(const dfp_isa_config* cfg, uint64_t* bounds, const int16_t* panel, size_t kpairs,
                             int width) {
  if (__atomic_load_n(&bounds[0], __ATOMIC_RELAXED) != DFP_BOUND_UNTAKEN) return;
  uint64_t fine[DFP_FINE_LEVELS];
  cfg->fine_bounds(panel, kpairs, width, fine);
  for (int level = 0; level < DFP_FINE_LEVELS; ++level) __atomic_store_n(&bounds[level], fine[level], __ATOMIC_RELAXED);
}

/* The chunk of a tile whose norm block's bound fails: the longer fine level its panels' bounds
 * prove, or 1. Cold: on Gaussian data no tile comes here. */
static __attribute__((noinline)) size_t short_chunk(const dfp_isa_config* cfg, const dfp_block* block, size_t i,
                                                    size_t j) {
  uint64_t* abound = block->abound + i * block->abound_stride;
  uint64_t* bbound = block->bbound + j * block->bbound_stride;
  take_fine_bounds(cfg, abound, block->a + i * block->a_stride, block->kpairs, cfg->ukernel->mr);
  take_fine_bounds(cfg, bbound, block->b + j * block->b_stride, block->kpairs, cfg->ukernel->nr);
  for (int level = DFP_FINE_LEVELS - 1; level >= 0; --level)
    if (proves(__atomic_load_n(&abound[level], __ATOMIC_RELAXED), __atomic_load_n(&bbound[level], __ATOMIC_RELAXED)))
      return (size_t)DFP_SHORT_CHUNK_PAIRS << level;
  return 1;
}

/* The chunk (in pairs) tile (i, j) of a block runs with: the longest, up to kpairs, over which
 * every partial sum of an A-panel row with a B-panel column provably stays within
 * +-DFP_CHUNK_SUM_MAX, from the panels' bounds for its K block (pack.h). By Cauchy-Schwarz
 * |sum_k a_k b_k| <= ||a|| ||b||, and a row's squared norm over a chunk is at most the bound of
 * its level. The level whose chunks cover kpairs is tried first: safe, it proves the whole
 * reduction at once (one product per tile, where the short K of a 1x1 layer leaves a tile ~200
 * cycles of arithmetic); else the longest safe level from the norm block's up; else a fine
 * level (short_chunk), or 1 (always safe: one pair is at most 2 * 32767^2 < DFP_CHUNK_SUM_MAX).
 * Flat data needs the fine levels: uniform mantissas' norm blocks against Gaussian ones fail
 * their bound, and a carry after every pair runs at a third of long chunks' rate. */
static inline size_t tile_chunk(const dfp_isa_config* cfg, const dfp_block* block, size_t i, size_t j) {
  const uint64_t* abound = block->abound + i * block->abound_stride;
  const uint64_t* bbound = block->bbound + j * block->bbound_stride;
  const size_t kpairs = block->kpairs;
  int whole = DFP_FINE_LEVELS;
  while (((size_t)DFP_SHORT_CHUNK_PAIRS << whole) < kpairs && whole < DFP_CHUNK_LEVELS - 1) ++whole;
  if (proves(abound[whole], bbound[whole])) return kpairs;
  size_t chunk = 1;
  for (int level = DFP_FINE_LEVELS; level < whole; ++level) {
    if (!proves(abound[level], bbound[level])) break;
    chunk = (size_t)DFP_SHORT_CHUNK_PAIRS << level;
  }
  return chunk > 1 ? chunk : short_chunk(cfg, block, i, j);
}

/* The block's tiles, B panel by B panel, each with its chunk: into int64 sums (s32 = 0, add as
 * dfp_multiply_block's) or int32 ones (s32 = 1: 0 at the first tile whose sums do not fit). */
static int multiply_tiles(const dfp_isa_config* cfg, const dfp_block* block, void* out, size_t ld, int add, int s32) {
  const dfp_ukernel* uk = cfg->ukernel;
  const size_t kc = block->kpairs, mr = (size_t)uk->mr, nr = (size_t)uk->nr;
  for (size_t j = 0; j < block->npanels; ++j) {
    const int16_t* b = block->b + j * block->b_stride;
    for (size_t i = 0; i < block->mpanels; ++i) {
      const int16_t* a = block->a + i * block->a_stride;
      const size_t chunk = tile_chunk(cfg, block, i, j);
      const size_t at = i * mr * ld + j * nr;
      if (!s32)
        uk->fn(kc, chunk, a, b, (int64_t*)out + at, ld, add);
      else if (!uk->store_s32(kc, chunk, a, b, (int32_t*)out + at, ld))
        return 0;
    }
  }
  return 1;
}

void dfp_multiply_block(const dfp_isa_config* cfg, const dfp_block* block, int64_t* acc, size_t ldc, int add) {
  multiply_tiles(cfg, block, acc, ldc, add, 0);
}

int dfp_multiply_block_s32(const dfp_isa_config* cfg, const dfp_block* block, int32_t* out, size_t ldo) {
  return multiply_tiles(cfg, block, out, ldo, 0, 1);
}

/* Whether all `rows` rows from row0 take the lanes' encoding, with their scale bits. */
static int normal_scales(const dfp_block_output* o, size_t row0, size_t rows, int32_t* scale) {
  for (size_t r = 0; r < rows; ++r) {
    if (!dfp_normal_scale(o->ea[row0 + r], o->eb)) return 0;
    scale[r] = (int32_t)((uint32_t)(o->ea[row0 + r] + o->eb) << 23);
  }
  return 1;
}

/* Whether a block's whole float32 tiles can take non-temporal stores: each tile row's first
 * element 64-byte aligned (nr float32 are a multiple of 64 bytes on the paths that stream). */
static int streams(const dfp_ukernel* uk, const dfp_block_output* o) {
  const uintptr_t first = (uintptr_t)((const uint32_t*)o->out->data + o->index);
  return o->stream && uk->encode_f32_stream != NULL && o->out->format == DFP_OUT_F32 && first % 64 == 0 &&
         o->ldo * sizeof(uint32_t) % 64 == 0;
}

/* A streamed block at least this many columns wide writes each A panel's rows through a strip in
 * the cache where the path has stream_rows: its tiles encoded there, then the rows streamed out
 * whole. On Zen 3's avx2 path the 1x1 layers with 256 or more output channels and a short
 * reduction (the 56x56 and 28x28 expand layers' forward, conv2's reduce layer's backward-data)
 * took 8-15% less time than with each tile's rows streamed as computed; 64 and 128 columns wide,
 * 2-20% more (docs/performance.md). */
enum { STRIP_MIN_COLS = 256 };

void dfp_multiply_encode_block(const dfp_isa_config* cfg, const dfp_block* block, const dfp_block_output* o) {
  const dfp_ukernel* uk = cfg->ukernel;
  const dfp_out_format format = o->out->format;
  const int sums = format == DFP_OUT_S64, split = dfp_out_is_split(format), stream = streams(uk, o);
  const dfp_ukernel_f32_fn encode_f32 = stream ? uk->encode_f32_stream : uk->encode_f32;
  const size_t kc = block->kpairs, mr = (size_t)uk->mr, nr = (size_t)uk->nr;
  int64_t tile[DFP_TILE_MAX_ELEMENTS];
  int32_t scale[DFP_TILE_MAX_ROWS];
  uint32_t* strip = NULL; /* [mr][o->cols]; where it cannot be had, the tiles stream themselves */
  if (stream && cfg->stream_rows != NULL && o->cols >= STRIP_MIN_COLS && o->cols == block->npanels * nr)
    strip = (uint32_t*)dfp_scratch(DFP_SCRATCH_ROW_STRIP, mr * o->cols * sizeof(uint32_t));
  /* A panel i against every B panel: its tiles write its rows left to right, whole runs of
   * the output rows (the other order, B panel j against every A panel as dfp_multiply_block
   * runs, writes 64 bytes to each of 66 rows in turn: up to 19% slower on the 56x56 1x1
   * layers, one thread, Zen 3). */
  for (size_t i = 0; i < block->mpanels; ++i) {
    const size_t row0 = i * mr, rows = o->rows - row0 < mr ? o->rows - row0 : mr;
    const int whole = rows == mr && !split && (sums || normal_scales(o, row0, mr, scale));
    const int16_t* a = block->a + i * block->a_stride;
    if (whole && strip != NULL) {
      for (size_t j = 0; j < block->npanels; ++j)
        uk->encode_f32(kc, tile_chunk(cfg, block, i, j), a,
                       block->b + j * block->b_stride, strip + j * nr, o->cols, scale);
      cfg->stream_rows(strip, mr, o->cols, (uint32_t*)o->out->data + o->index + row0 * o->ldo, o->ldo);
      continue;
    }
    for (size_t j = 0; j < block->npanels; ++j) {
      const size_t col0 = j * nr, cols = o->cols - col0 < nr ? o->cols - col0 : nr;
      const size_t chunk = tile_chunk(cfg, block, i, j);
      const int16_t* b = block->b + j * block->b_stride;
      const size_t index = o->index + row0 * o->ldo + col0;
      if (whole && cols == nr) {
        if (sums) uk->fn(kc, chunk, a, b, (int64_t*)o->out->data + index, o->ldo, 0);
        else encode_f32(kc, chunk, a, b, (uint32_t*)o->out->data + index, o->ldo, scale);
        continue;
      }
      /* A partial tile, a row's scale past the lanes' encoding, or split sums: through the
       * int64 tile and the output stage. */
      uk->fn(kc, chunk, a, b, tile, nr, 0);
      for (size_t r = 0; r < rows; ++r)
        dfp_encode_row(cfg, o->out, index + r * o->ldo, tile + r * nr, cols, o->ea[row0 + r], &o->eb, 0);
    }
  }
#if defined(DFPJAX_X86)
  /* Non-temporal stores are weakly ordered: visible to the thread that joins this task only
   * after a fence. */
  if (stream) _mm_sfence();
#endif
}

void dfp_encode_f32_portable(const int64_t* s, size_t n, int32_t ea, const int32_t* eb,
                             size_t eb_stride, uint32_t* out) {
  for (size_t j = 0; j < n; ++j) out[j] = dfp_encode_f32(s[j], ea, eb[j * eb_stride]);
}

void dfp_add_runs_portable(int64_t* dst, const size_t* offsets, const int64_t* src, size_t n, size_t runs) {
  for (size_t r = 0; r < runs; ++r, src += n)
    for (size_t j = 0; j < n; ++j) dst[offsets[r] + j] += src[j];
}

int dfp_check_output(const dfp_output* out, uint64_t terms) {
  if (!dfp_out_is_split(out->format)) return DFP_OK;
  const int most = 8 * dfp_out_low_bytes(out->format);
  if (out->low_bits < 1 || out->low_bits > most) return DFP_ERR_BAD_SHAPE;
  /* |s| <= terms * 32767**2, so the high part lies in [-ceil(bound), floor(bound)] of
   * bound = terms * 32767**2 / 2**low_bits. */
  const unsigned __int128 largest = (unsigned __int128)terms * 32767 * 32767;
  const unsigned __int128 high = (largest + ((UINT64_C(1) << out->low_bits) - 1)) >> out->low_bits;
  return high <= (unsigned __int128)INT32_MAX ? DFP_OK : DFP_ERR_BAD_SHAPE;
}

void dfp_split_sums_portable(const int64_t* restrict s, size_t n, int low_bits, int low_bytes,
                             uint32_t* restrict high, void* restrict low) {
  const uint64_t mask = (UINT64_C(1) << low_bits) - 1;
  for (size_t j = 0; j < n; ++j) {
    high[j] = (uint32_t)((uint64_t)s[j] >> low_bits);
    if (low_bytes == 1) ((uint8_t*)low)[j] = (uint8_t)((uint64_t)s[j] & mask);
    else ((uint16_t*)low)[j] = (uint16_t)((uint64_t)s[j] & mask);
  }
}

void dfp_encode_row(const dfp_isa_config* cfg, const dfp_output* out, size_t out_index,
                    const int64_t* s, size_t n, int32_t ea, const int32_t* eb, size_t eb_stride) {
  const dfp_out_format format = out->format;
  if (format == DFP_OUT_F32) {
    cfg->encode_f32(s, n, ea, eb, eb_stride, (uint32_t*)out->data + out_index);
    return;
  }
  if (format == DFP_OUT_S64) {
    memcpy((int64_t*)out->data + out_index, s, n * sizeof(int64_t));
    return;
  }
  if (dfp_out_is_split(format)) {
    const int low_bytes = dfp_out_low_bytes(format);
    cfg->split_sums(s, n, out->low_bits, low_bytes, (uint32_t*)out->data + out_index,
                    (uint8_t*)out->low + out_index * low_bytes);
    return;
  }
  const int bf16 = format == DFP_OUT_BF16;
  uint16_t* o = (uint16_t*)out->data + out_index;
  for (size_t j = 0; j < n; ++j) {
    const int32_t e = eb[j * eb_stride];
    o[j] = (ea == DFP_NONFINITE_EXPONENT || e == DFP_NONFINITE_EXPONENT)
               ? (bf16 ? 0x7fc0 : 0x7e00)
               : (uint16_t)dfp_encode_scaled(s[j], (int64_t)ea + e, bf16 ? &kDfpBF16 : &kDfpF16);
  }
}

void dfp_advise_output(void* out, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  if (bytes < DFP_HUGE_OUTPUT_BYTES) return;
  const uintptr_t begin = ((uintptr_t)out + huge - 1) & ~(huge - 1), end = ((uintptr_t)out + bytes) & ~(huge - 1);
  if (end > begin) (void)madvise((void*)begin, end - begin, MADV_HUGEPAGE);
#else
  (void)out;
  (void)bytes;
#endif
}

typedef struct {
  void* data[DFP_SCRATCH_SLOTS];
  size_t bytes[DFP_SCRATCH_SLOTS];
} scratch_set;

static pthread_key_t scratch_key; /* a thread's set; its destructor frees it when the thread exits */
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_made;

/* Under AddressSanitizer a kept buffer's bytes past the current request are poisoned, so that
 * a task overrunning its request is caught as in a buffer of its own. */
static void scratch_fit(void* p, size_t bytes, size_t capacity) {
#if defined(__SANITIZE_ADDRESS__)
  if (p == NULL) return;
  ASAN_UNPOISON_MEMORY_REGION(p, capacity);
  ASAN_POISON_MEMORY_REGION((char*)p + bytes, capacity - bytes);
#else
  (void)p;
  (void)bytes;
  (void)capacity;
#endif
}

static void free_scratch(void* set) {
  scratch_set* s = (scratch_set*)set;
  for (int i = 0; i < DFP_SCRATCH_SLOTS; ++i) {
    scratch_fit(s->data[i], s->bytes[i], s->bytes[i]);
    free(s->data[i]);
  }
  free(s);
}

static void make_scratch_key(void) { scratch_key_made = pthread_key_create(&scratch_key, free_scratch) == 0; }

void* dfp_scratch(dfp_scratch_slot slot, size_t bytes) {
  (void)pthread_once(&scratch_once, make_scratch_key);
  if (!scratch_key_made) return NULL;
  scratch_set* s = (scratch_set*)pthread_getspecific(scratch_key);
  if (s == NULL) {
    if ((s = (scratch_set*)calloc(1, sizeof *s)) == NULL) return NULL;
    if (pthread_setspecific(scratch_key, s) != 0) {
      free(s);
      return NULL;
    }
  }
  if (bytes == 0) bytes = 1; /* a buffer all the same: NULL means out of memory */
  if (s->bytes[slot] < bytes) {
    const size_t grown = (bytes + 63) / 64 * 64;
    scratch_fit(s->data[slot], 0, s->bytes[slot]);
    free(s->data[slot]);
    s->data[slot] = aligned_alloc(64, grown);
    s->bytes[slot] = s->data[slot] != NULL ? grown : 0;
  }
  scratch_fit(s->data[slot], bytes, s->bytes[slot]);
  return s->data[slot];
}

static void serial_for(void* pool, size_t n, dfp_task_fn task, void* arg) {
  (void)pool;
  for (size_t i = 0; i < n; ++i) task(arg, i);
}

const dfp_parallel dfp_serial = {serial_for, NULL, 1};

int dfp_plan_init(dfp_isa isa, const dfp_parallel** par, const dfp_isa_config** cfg, int* mr, int* nr) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  if (*par == NULL) *par = &dfp_serial;
  *cfg = dfp_isa_config_for(isa);
  *mr = (*cfg)->ukernel->mr;
  *nr = (*cfg)->ukernel->nr;
  return DFP_OK;
}
