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
  kChunk = 1 << 16,  /* elements per task: big enough to amortize scheduling (4% faster than
                      * 1 << 15 on Zen 3, 2 threads, 103 MB; 1 << 17 and 1 << 18 no faster on
                      * Zen 4, both with each piece maxed before it was quantized) */
  kPiece = 1 << 13,  /* elements of a chunk quantized before its group's exponent is checked
                      * again: the chunk so far is quantized again from the cache where it rose */
};

/* The magnitude bits of +inf: a group whose max is at or above them is not finite. */
static const uint32_t kInfBits = 0x7f800000u;

uint32_t dfp_max_magnitude_portable(const float* x, size_t n) {
  const uint32_t* u = (const uint32_t*)x;
  uint32_t top = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t mag = u[i] & 0x7fffffffu;
    top = mag > top ? mag : top;
  }
  return top;
}

/* One element of the portable row (the specification; the SIMD rows' tails take that row). */
static int16_t dfp_quantize_one(uint32_t u, int32_t e, int32_t limit) {
  const uint32_t mag = u & 0x7fffffffu, biased = mag >> 23;
  const uint32_t sig = biased ? (mag & 0x7fffffu) | 0x800000u : mag;
  const int32_t shift = (int32_t)(biased ? biased : 1) - 150 - e;  /* |x| = sig * 2**(shift + e) */
  uint64_t q;
  if (shift >= 0) {
    q = (uint64_t)sig << (shift < 40 ? shift : 40); /* past the range (quantize_row) saturates */
  } else {
    /* Past 25 bits every sig (< 2**24) rounds to 0, as at 25. */
    const int r = -shift > 25 ? 25 : -shift;
    const uint32_t rem = sig & ((1u << r) - 1), half = 1u << (r - 1);
    q = (sig >> r);
    q += rem > half || (rem == half && (q & 1));
  }
  const int32_t v = q > (uint64_t)limit ? limit : (int32_t)q;
  return (int16_t)(u >> 31 ? -v : v);
}

uint32_t dfp_quantize_row_portable(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream) {
  (void)stream; /* plain stores: the specification */
  const uint32_t* u = (const uint32_t*)x;
  for (size_t i = 0; i < n; ++i) m[i] = dfp_quantize_one(u[i], e, limit);
  return dfp_max_magnitude_portable(x, n);
}

/* floor(log2) of the float whose magnitude bits are mag > 0 (subnormals included). */
static int32_t floor_log2_bits(uint32_t mag) {
  const uint32_t biased = mag >> 23;
  return biased ? (int32_t)biased - 127 : (31 - __builtin_clz(mag)) - 149;
}

/* The largest mantissa magnitude of a bits-bit quantization. */
static int32_t mantissa_limit(const dfp_quantize_args* a) { return (1 << (a->bits - 1)) - 1; }

/* The exponent of a group whose largest magnitude bit pattern is top. */
static int32_t group_exponent(uint32_t top, const dfp_quantize_args* a) {
  return top >= kInfBits ? DFP_NONFINITE_EXPONENT
         : top == 0        ? 0
                           : floor_log2_bits(top) - (a->bits - 2) + a->headroom;
}

/* One pass over the floats where it can: each task takes its chunk piece by piece and quantizes
 * each piece, as it streams in from memory, with the exponent of its group's running max
 * (seen) before the piece, taking the piece's own max from the same loads; where the piece (or
 * another task) raised that max into a higher binade, the chunk so far, still in L2, is
 * quantized again, so the whole chunk has one exponent, recorded in used[task]. The mantissas
 * depend on that exponent alone, so they are the spec's whenever the group's final exponent is
 * the same; the rest (an early chunk below the final binade, a non-finite or all-zero group)
 * are redone from the floats afterwards (redo_task), so the result never depends on the order
 * the tasks ran in. A rise of a group's binade costs at most one chunk quantized again in the
 * cache; the chunks finished before the group's last rise are quantized once more, from
 * memory. Maxing each piece before quantizing it (the max of the next piece in the loop of
 * this one: the floats read from memory, then again from the cache) took 10-20% longer on
 * Zen 4, 2 threads: 103 MB in 3.1-3.5 ms against 2.8-3.1, where streaming the same bytes in and
 * out with no arithmetic takes 2.8-3.0 (benchmarks/conv_phases.c). */
typedef struct {
  const dfp_quantize_args* args;
  size_t chunks_per_group;
  uint32_t* seen;  /* [groups]: the largest magnitude of the group seen so far; once every task
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
  const int32_t limit = mantissa_limit(a);
  int32_t e = kNotQuantized;
  size_t done = 0; /* [0, done) quantized with e: 0 or p at each piece */
  for (size_t p = 0; p < len; p += kPiece) {
    const size_t n = piece_length(len, p);
    if (done == 0) { /* the exponent of the group's max so far, if there is one */
      const uint32_t before = __atomic_load_n(&j->seen[g], __ATOMIC_RELAXED);
      if (before >= kInfBits) break; /* non-finite: redo_task writes the zeros */
      e = before ? group_exponent(before, a) : kNotQuantized;
    }
    uint32_t piece_max;
    if (e != kNotQuantized && done == p) {
      piece_max = j->cfg->quantize_row(x + p, n, e, limit, m + p, j->stream);
      done = p + n;
    } else { /* quantized below, once there is an exponent */
      piece_max = j->cfg->max_magnitude(x + p, n);
    }
    const uint32_t running = raise_max(&j->seen[g], piece_max);
    if (running >= kInfBits) {
      done = 0;
      break;
    }
    if (running == 0) continue; /* all zero so far */
    const int32_t now = group_exponent(running, a);
    if (now != e || done < p + n) { /* a higher binade (this piece's or another task's), or
                                      * pieces maxed before there was an exponent */
      j->cfg->quantize_row(x, p + n, now, limit, m, j->stream);
      e = now, done = p + n;
    }
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
    j->cfg->quantize_row(a->x + g * a->n + begin, len, e, mantissa_limit(a), m, j->stream);
}

/* dfp_max_magnitudes: max_quantize_task's maxima alone, each chunk's raising its group's in
 * j->seen (the caller's top). */
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
