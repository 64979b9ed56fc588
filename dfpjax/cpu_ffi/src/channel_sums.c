/* dfp_channel_sums: per-channel sums of float32 rows in one read of the operands, added in
 * double in an order fixed by the shape alone (each block of rows in order, then the blocks in
 * order), so the result is the same on every path and thread count. A task takes a block of
 * rows and of at most kBlockChannels channels, whose double sums stay in the L1 cache. */
#include <stdlib.h>

#include "channel_sums.h"
#include "dfp_kernel.h"
#include "isa_config.h"
#include "macro.h"

enum {
  kBlockElements = 1 << 15,  /* per task: big enough to amortize scheduling */
  kBlockChannels = 512,      /* per task: their sums and dots take 8 KiB */
};

void dfp_channel_sums_rows_portable(const float* a, const float* b, const float* center, size_t rows,
                                    size_t channels, size_t stride, double* sum, double* dot) {
  for (size_t r = 0; r < rows; ++r, a += stride, b += stride)
    for (size_t c = 0; c < channels; ++c) {
      const float centered = b[c] - center[c];
      sum[c] += (double)a[c];
      dot[c] += (double)a[c] * (double)centered;
    }
}

typedef struct {
  const dfp_channel_sums_args* args;
  size_t block_rows, blocks_per_group, channel_blocks;
  double* partial; /* [groups][blocks_per_group][2][channels]: each block's sums and dots */
  const dfp_isa_config* cfg;
} job;

static void block_task(void* arg, size_t task) {
  const job* j = (const job*)arg;
  const dfp_channel_sums_args* s = j->args;
  const size_t block = task / j->channel_blocks, c0 = (task % j->channel_blocks) * kBlockChannels;
  const size_t g = block / j->blocks_per_group, first = (block % j->blocks_per_group) * j->block_rows;
  const size_t rows = s->rows - first < j->block_rows ? s->rows - first : j->block_rows;
  const size_t channels = s->channels - c0 < kBlockChannels ? s->channels - c0 : kBlockChannels;
  double* sum = j->partial + block * 2 * s->channels + c0;
  double* dot = sum + s->channels;
  for (size_t c = 0; c < channels; ++c) sum[c] = dot[c] = 0.0;
  const size_t offset = (g * s->rows + first) * s->channels + c0;
  j->cfg->channel_sums_rows(s->a + offset, s->b + offset, s->center + g * s->channels + c0, rows,
                            channels, s->channels, sum, dot);
}

int dfp_channel_sums(const dfp_channel_sums_args* args, dfp_isa isa, const dfp_parallel* par) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  if (par == NULL) par = &dfp_serial;
  const size_t groups = args->groups, channels = args->channels, rows = args->rows;
  if (groups == 0 || channels == 0) return DFP_OK;
  const size_t task_channels = channels < kBlockChannels ? channels : kBlockChannels;
  job j = {args, kBlockElements / task_channels, 0, (channels + kBlockChannels - 1) / kBlockChannels, NULL,
           dfp_isa_config_for(isa)};
  j.blocks_per_group = rows ? (rows + j.block_rows - 1) / j.block_rows : 0;
  const size_t blocks = groups * j.blocks_per_group, tasks = blocks * j.channel_blocks;
  if (tasks) {
    j.partial = (double*)malloc(blocks * 2 * channels * sizeof(double));
    if (j.partial == NULL) return DFP_ERR_ALLOC;
    par->parallel_for(par->pool, tasks, block_task, &j);
  }
  for (size_t g = 0; g < groups; ++g)
    for (size_t c = 0; c < channels; ++c) {
      double sum = 0.0, dot = 0.0;
      for (size_t k = 0; k < j.blocks_per_group; ++k) {
        const double* block = j.partial + ((g * j.blocks_per_group + k) * 2) * channels;
        sum += block[c];
        dot += block[channels + c];
      }
      args->sum[g * channels + c] = (float)sum;
      args->dot[g * channels + c] = (float)dot;
    }
  free(j.partial);
  return DFP_OK;
}
