/* dfp_quantize: the per-group exponent from one max-magnitude pass, then the mantissas,
 * both split over the thread pool in chunks. */
#include <stdlib.h>

#include "dfp_kernel.h"
#include "encode.h"
#include "quantize.h"
#include "isa_config.h"
#include "macro.h"

enum { kChunk = 1 << 15 };  /* elements per task: big enough to amortize scheduling */

uint32_t dfp_max_magnitude_portable(const float* x, size_t n) {
  const uint32_t* u = (const uint32_t*)x;
  uint32_t top = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t mag = u[i] & 0x7fffffffu;
    top = mag > top ? mag : top;
  }
  return top;
}

void dfp_quantize_row_portable(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m) {
  const uint32_t* u = (const uint32_t*)x;
  for (size_t i = 0; i < n; ++i) m[i] = dfp_quantize_one(u[i], e, limit);
}

/* floor(log2) of the float whose magnitude bits are mag > 0 (subnormals included). */
static int32_t floor_log2_bits(uint32_t mag) {
  const uint32_t biased = mag >> 23;
  return biased ? (int32_t)biased - 127 : (31 - __builtin_clz(mag)) - 149;
}

typedef struct {
  const dfp_quantize_args* args;
  size_t chunks_per_group;
  uint32_t* chunk_max;
  const dfp_isa_config* cfg;
} job;

static void chunk_range(const job* j, size_t task, size_t* group, size_t* begin, size_t* len) {
  const size_t n = j->args->n;
  *group = task / j->chunks_per_group;
  *begin = (task % j->chunks_per_group) * kChunk;
  *len = n - *begin < (size_t)kChunk ? n - *begin : (size_t)kChunk;
}

static void max_task(void* arg, size_t task) {
  const job* j = (const job*)arg;
  size_t g, begin, len;
  chunk_range(j, task, &g, &begin, &len);
  j->chunk_max[task] = j->cfg->max_magnitude(j->args->x + g * j->args->n + begin, len);
}

static void quantize_task(void* arg, size_t task) {
  const job* j = (const job*)arg;
  const dfp_quantize_args* a = j->args;
  size_t g, begin, len;
  chunk_range(j, task, &g, &begin, &len);
  const float* x = a->x + g * a->n + begin;
  int16_t* m = a->m + g * a->n + begin;
  const int32_t e = a->e[g], limit = (1 << (a->bits - 1)) - 1;
  if (e == DFP_NONFINITE_EXPONENT || j->chunk_max[g * j->chunks_per_group] == 0) {
    for (size_t i = 0; i < len; ++i) m[i] = 0;  /* non-finite or all-zero group */
    return;
  }
  j->cfg->quantize_row(x, len, e, limit, m);
}

int dfp_quantize(const dfp_quantize_args* args, dfp_isa isa, const dfp_parallel* par) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  if (args->bits < 2 || args->bits > 16 || args->headroom < 0 || args->headroom > args->bits - 2)
    return DFP_ERR_BAD_SHAPE;
  if (args->groups == 0) return DFP_OK;
  if (par == NULL) par = &dfp_serial;
  job j = {args, args->n ? (args->n + kChunk - 1) / kChunk : 1, NULL, dfp_isa_config_for(isa)};
  const size_t tasks = args->groups * j.chunks_per_group;
  j.chunk_max = (uint32_t*)calloc(tasks, sizeof(uint32_t));
  if (j.chunk_max == NULL) return DFP_ERR_ALLOC;
  if (args->n) par->parallel_for(par->pool, tasks, max_task, &j);
  for (size_t g = 0; g < args->groups; ++g) {
    uint32_t top = 0;
    for (size_t c = 0; c < j.chunks_per_group; ++c) {
      const uint32_t v = j.chunk_max[g * j.chunks_per_group + c];
      top = v > top ? v : top;
    }
    j.chunk_max[g * j.chunks_per_group] = top;  /* the group's max, read by quantize_task */
    args->e[g] = top >= 0x7f800000u ? DFP_NONFINITE_EXPONENT
                 : top == 0        ? 0
                                   : floor_log2_bits(top) - (args->bits - 2) + args->headroom;
  }
  dfp_advise_output(args->m, args->groups * args->n * sizeof(int16_t));
  if (args->n) par->parallel_for(par->pool, tasks, quantize_task, &j);
  free(j.chunk_max);
  return DFP_OK;
}
