/* dfp_quantize: the per-group exponent and the mantissas, split over the thread pool in chunks,
 * in one pass over the floats where the chunks' maxima allow (max_quantize_task), or where the
 * groups' maxima are given (group_max: a shard quantized with its whole group's exponent). */
#include <stdlib.h>

#include "dfp_kernel.h"
#include "encode.h"
#include "quantize.h"
#include "isa_config.h"
#include "macro.h"

enum {
  kChunk = 1 << 16,  /* elements per task: big enough to amortize scheduling and the first
                      * piece's max and the last one's quantization, each alone (4% faster than
                      * 1 << 15 on Zen 3, 2 threads, 103 MB) */
  kPiece = 1 << 13,  /* elements of a chunk maxed, then quantized while in the cache (32 KB:
                      * 16 KB and 64 KB pieces took 5-10% longer, 103 MB on 2 Zen 3 threads) */
};

uint32_t dfp_max_magnitude_portable(const float* x, size_t n) {
  const uint32_t* u = (const uint32_t*)x;
  uint32_t top = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t mag = u[i] & 0x7fffffffu;
    top = mag > top ? mag : top;
  }
  return top;
}

uint32_t dfp_quantize_row_portable(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream,
                                   const float* next, size_t next_n) {
  (void)stream; /* plain stores: the specification */
  const uint32_t* u = (const uint32_t*)x;
  for (size_t i = 0; i < n; ++i) m[i] = dfp_quantize_one(u[i], e, limit);
  return dfp_max_magnitude_portable(next, next_n);
}

/* floor(log2) of the float whose magnitude bits are mag > 0 (subnormals included). */
static int32_t floor_log2_bits(uint32_t mag) {
  const uint32_t biased = mag >> 23;
  return biased ? (int32_t)biased - 127 : (31 - __builtin_clz(mag)) - 149;
}

/* The exponent of a group whose largest magnitude bit pattern is top. */
static int32_t group_exponent(uint32_t top, const dfp_quantize_args* a) {
  return top >= 0x7f800000u ? DFP_NONFINITE_EXPONENT
         : top == 0        ? 0
                           : floor_log2_bits(top) - (a->bits - 2) + a->headroom;
}

/* One pass over the floats where it can: each task takes its chunk piece by piece, raises its
 * group's running max (seen) with each piece's max and quantizes the piece, still in the cache,
 * with the exponent of that running max, in the loop that maxes the next piece from memory (the
 * rows' next: 15-20% faster than a max pass, then a quantize pass per piece, on Zen 3 with 2
 * threads); where the exponent rises within the chunk, the pieces
 * before, still in L2, are quantized again, so the whole chunk has one exponent, recorded in
 * used[task]. The mantissas depend on that exponent alone, so they are the spec's whenever the
 * group's final exponent is the same; the rest (an early chunk below the final binade, a
 * non-finite or all-zero group) are redone from the floats afterwards (redo_task), so the result
 * never depends on the order the tasks ran in. At worst (a group's max rising binade by binade,
 * chunk by chunk) that is one more quantize pass than reading the floats twice would take. A
 * chunk's max taken whole before its quantization left the memory idle while the chunk was
 * quantized from L2: 103 MB of floats took 5 ms against 3 ms for one streamed read and write on
 * Zen 3, 2 threads. */
typedef struct {
  const dfp_quantize_args* args;
  size_t chunks_per_group;
  uint32_t* seen;  /* [groups]: the largest chunk max of the group so far; once every task
                    * has run, the group's max */
  int32_t* used;   /* [tasks]: the exponent the chunk was quantized with, kNotQuantized if none */
  const dfp_isa_config* cfg;
  int stream;      /* the mantissas are an output of DFP_STREAM_OUTPUT_BYTES or more */
} job;

enum { kNotQuantized = INT32_MIN };

static void chunk_range(const job* j, size_t task, size_t* group, size_t* begin, size_t* len) {
  const size_t n = j->args->n;
  *group = task / j->chunks_per_group;
  *begin = (task % j->chunks_per_group) * kChunk;
  *len = n - *begin < (size_t)kChunk ? n - *begin : (size_t)kChunk;
}

/* The elements of a chunk of len from its element p on, in a piece: 0 past the chunk's end. */
static size_t piece_length(size_t len, size_t p) {
  return p >= len ? 0 : len - p < (size_t)kPiece ? len - p : (size_t)kPiece;
}

/* The larger of *seen and v, stored in *seen. */
static uint32_t raise_max(uint32_t* seen, uint32_t v) {
  uint32_t old = __atomic_load_n(seen, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(seen, &old, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old > v ? old : v;
}

static void max_quantize_task(void* arg, size_t task) {
  const job* j = (const job*)arg;
  const dfp_quantize_args* a = j->args;
  size_t g, begin, len;
  chunk_range(j, task, &g, &begin, &len);
  const float* x = a->x + g * a->n + begin;
  int16_t* m = a->m + g * a->n + begin;
  int32_t e = kNotQuantized;
  size_t done = 0; /* [0, done) quantized with e */
  uint32_t piece_max = j->cfg->max_magnitude(x, piece_length(len, 0));
  for (size_t p = 0; p < len; p += kPiece) {
    const size_t n = piece_length(len, p), next_n = piece_length(len, p + n);
    const uint32_t running = raise_max(&j->seen[g], piece_max);
    if (running >= 0x7f800000u) { /* non-finite: redo_task writes the zeros */
      e = kNotQuantized;
      break;
    }
    if (running == 0) { /* all zero so far: quantized once there is an exponent */
      piece_max = j->cfg->max_magnitude(x + p + n, next_n);
      continue;
    }
    const int32_t now = group_exponent(running, a);
    if (now != e) e = now, done = 0;
    piece_max = j->cfg->quantize_row(x + done, p + n - done, e, (1 << (a->bits - 1)) - 1, m + done, j->stream,
                                     x + p + n, next_n);
    done = p + n;
  }
  j->used[task] = done == len ? e : kNotQuantized;
}

static void redo_task(void* arg, size_t task) {
  const job* j = (const job*)arg;
  const dfp_quantize_args* a = j->args;
  size_t g, begin, len;
  chunk_range(j, task, &g, &begin, &len);
  const int32_t e = a->e[g];
  const int zeros = e == DFP_NONFINITE_EXPONENT || j->seen[g] == 0; /* non-finite or all-zero group */
  if (!zeros && j->used[task] == e) return;
  int16_t* m = a->m + g * a->n + begin;
  if (zeros)
    for (size_t i = 0; i < len; ++i) m[i] = 0;
  else
    j->cfg->quantize_row(a->x + g * a->n + begin, len, e, (1 << (a->bits - 1)) - 1, m, j->stream, NULL, 0);
}

/* dfp_max_magnitudes: max_quantize_task's first step alone, each chunk's max raising its
 * group's in j->seen (the caller's top). */
static void max_task(void* arg, size_t task) {
  const job* j = (const job*)arg;
  size_t g, begin, len;
  chunk_range(j, task, &g, &begin, &len);
  raise_max(&j->seen[g], j->cfg->max_magnitude(j->args->x + g * j->args->n + begin, len));
}

int dfp_max_magnitudes(const float* x, size_t groups, size_t n, uint32_t* top, dfp_isa isa,
                       const dfp_parallel* par) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  if (par == NULL) par = &dfp_serial;
  for (size_t g = 0; g < groups; ++g) top[g] = 0;
  if (groups == 0 || n == 0) return DFP_OK;
  const dfp_quantize_args args = {.groups = groups, .n = n, .x = x};
  job j = {&args, (n + kChunk - 1) / kChunk, top, NULL, dfp_isa_config_for(isa), 0};
  par->parallel_for(par->pool, groups * j.chunks_per_group, max_task, &j);
  return DFP_OK;
}

int dfp_quantize(const dfp_quantize_args* args, dfp_isa isa, const dfp_parallel* par) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  if (args->bits < 2 || args->bits > 16 || args->headroom < 0 || args->headroom > args->bits - 2)
    return DFP_ERR_BAD_SHAPE;
  if (args->groups == 0) return DFP_OK;
  if (par == NULL) par = &dfp_serial;
  job j = {args, args->n ? (args->n + kChunk - 1) / kChunk : 1, NULL, NULL, dfp_isa_config_for(isa),
           dfp_stream_output(args->groups * args->n * sizeof(int16_t))};
  const size_t tasks = args->groups * j.chunks_per_group;
  j.seen = (uint32_t*)calloc(args->groups, sizeof(uint32_t));
  j.used = (int32_t*)malloc(tasks * sizeof(int32_t));
  if (j.seen == NULL || j.used == NULL) {
    free(j.seen);
    free(j.used);
    return DFP_ERR_ALLOC;
  }
  dfp_advise_output(args->m, args->groups * args->n * sizeof(int16_t));
  if (args->group_max != NULL) { /* the maxima are known: redo_task forms every mantissa */
    for (size_t g = 0; g < args->groups; ++g) j.seen[g] = args->group_max[g];
    for (size_t t = 0; t < tasks; ++t) j.used[t] = kNotQuantized;
  } else if (args->n) {
    par->parallel_for(par->pool, tasks, max_quantize_task, &j);
  }
  for (size_t g = 0; g < args->groups; ++g) args->e[g] = group_exponent(j.seen[g], args);
  if (args->n) par->parallel_for(par->pool, tasks, redo_task, &j);
  free(j.seen);
  free(j.used);
  return DFP_OK;
}
