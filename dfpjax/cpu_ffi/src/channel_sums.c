/* dfp_channel_sums: per-channel sums of float32 rows in one read of the operands, added in
 * double in an order fixed by the shape alone (each block of rows in order, then the blocks in
 * order), so the result is the same on every path and thread count. A task takes a block of
 * rows and of at most kBlockChannels channels, whose double sums stay in the L1 cache: in a
 * buffer on the task's stack, aligned to cache lines, copied out once at the end. */
#include <stdlib.h>
#include <string.h>

#include "channel_sums.h"
#include "dfp_kernel.h"
#include "isa_config.h"
#include "macro.h"

enum {
  /* per task: fewer blocks' partial sums to write and add (one thread, Zen 4, sums of squares:
   * 1024 channels 4.6 -> 3.0 ms, 256 channels 3.4 -> 2.6 ms against 1 << 15; 1 << 18 no better) */
  kBlockElements = 1 << 17,
  /* per task: their sums and dots take 16 KiB. A task that reads part of each row ran at a
   * third of the rate of one that reads whole rows (one thread, Zen 4: 1024 channels in two
   * blocks of 512 6.9 GB/s, in one 18.4; 2048 channels are slow either way, 7 GB/s, their
   * 32 KiB of sums past L1). */
  kBlockChannels = 1024,
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
  /* Summed in place in the partial array (16-byte aligned, each task's slice new lines) the
   * rows ran 1.5-1.8x slower (one thread, Zen 4, 64 and 256 channels). */
  _Alignas(64) double sum[kBlockChannels], dot[kBlockChannels];
  for (size_t c = 0; c < channels; ++c) sum[c] = dot[c] = 0.0;
  const size_t offset = (g * s->rows + first) * s->channels + c0;
  j->cfg->channel_sums_rows(s->a + offset, s->b + offset, s->center + g * s->channels + c0, rows,
                            channels, s->channels, sum, dot);
  double* out = j->partial + block * 2 * s->channels + c0;
  memcpy(out, sum, channels * sizeof(double));
  memcpy(out + s->channels, dot, channels * sizeof(double));
}

int dfp_channel_sums(const dfp_channel_sums_args* args, dfp_isa isa, const dfp_parallel* par) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  if (par == NULL) par = &dfp_serial;
  const size_t groups = args->groups, channels = args->channels, rows = args->rows;
  if (groups == 0 || channels == 0) return DFP_OK;
  if (rows == 0) { /* sums of nothing */
    for (size_t i = 0; i < groups * channels; ++i) args->sum[i] = args->dot[i] = 0.0f;
    return DFP_OK;
  }
  const size_t task_channels = channels < kBlockChannels ? channels : kBlockChannels;
  job j = {args, kBlockElements / task_channels, 0, (channels + kBlockChannels - 1) / kBlockChannels, NULL,
           dfp_isa_config_for(isa)};
  j.blocks_per_group = (rows + j.block_rows - 1) / j.block_rows;
  const size_t blocks = groups * j.blocks_per_group;
  j.partial = (double*)malloc(blocks * 2 * channels * sizeof(double));
  if (j.partial == NULL) return DFP_ERR_ALLOC;
  par->parallel_for(par->pool, blocks * j.channel_blocks, block_task, &j);
  /* Each channel's blocks added in block order from 0.0, into the group's first block, a block
   * at a time: channel by channel, a walk down the blocks 16 KiB apart took longer than the
   * rows did (6.3 MB of 1024 channels' blocks). */
  for (size_t g = 0; g < groups; ++g) {
    double* total = j.partial + g * j.blocks_per_group * 2 * channels;
    for (size_t c = 0; c < 2 * channels; ++c) total[c] = 0.0 + total[c];
    for (size_t k = 1; k < j.blocks_per_group; ++k) {
      const double* block = total + k * 2 * channels;
      for (size_t c = 0; c < 2 * channels; ++c) total[c] += block[c];
    }
    for (size_t c = 0; c < channels; ++c) {
      args->sum[g * channels + c] = (float)total[c];
      args->dot[g * channels + c] = (float)total[channels + c];
    }
  }
  free(j.partial);
  return DFP_OK;
}
