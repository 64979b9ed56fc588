/* Macro-loops of the exact DFP convolutions (dfp_kernel.h), per feature group g:
 *   forward           y[(n,p), o]  = sum over (t,c) of patches[(n,p), (t,c)] * w[(t,c), o]
 *   backward-weights  dw[(t,c), o] = sum over (n,p) of patches[(n,p), (t,c)] * dy[(n,p), o]
 * The weights (forward) are packed once as the B operand, the output gradient
 * (backward-weights) at once, in rounds of K blocks (plan_rounds) or, where the sums are small,
 * by each task for its own K blocks (conv_run); the patches are packed per
 * cache block as the A operand (im2col.c), so no patch matrix is materialized (a 1x1
 * convolution's is x itself). The block routine and output stage are the GEMM's (macro.h).
 * Backward-data is usually a forward convolution of dy with the flipped weights (the caller
 * sets up its geometry), whose packing reads them flipped and transposed from the forward's
 * weights in place (dfp_weight_view); for inputs with few channels dfp_conv_backward_data
 * runs it as col2im instead (below). */
#include <stdlib.h>
#include <string.h>

#include "dfp_kernel.h"
#include "im2col.h"
#include "isa_config.h"
#include "macro.h"
#include "pack.h"

enum {
  CONV_MC_ROWS = 64,   /* rows of a forward cache block, rounded up to whole micro-panels */
  TASKS_PER_THREAD = 4,
  /* Backward-weights packs dy (its B operand, as large as dy) in rounds of K blocks of at
   * most this many bytes: a buffer glibc reuses, instead of one it maps and zero-fills afresh
   * on every call (51 MB for the stem at batch 32), and one that stays in the cache. Rounds
   * need int64 sums the size of the output across them, so layers whose output outweighs
   * their dy (few pixels, many taps and channels) pack all of dy at once (plan_rounds). */
  CONV_ROUND_BYTES = 4 << 20,
  /* A backward-weights task that packs its own dy keeps int64 sums of every row block of its
   * column block, read and written once a K block: up to a Zen 3 core's L2. Sums of 1.2 MB
   * and more (conv3-5's 3x3 layers) took 9-12% longer on two threads than rounds of dy. */
  CONV_TASK_SUMS_BYTES = 512 << 10,
};

typedef struct {
  const dfp_conv_args* args;
  const dfp_isa_config* cfg;
  int mr, nr;
  int backward;
  int plain_weights;              /* b is dy, or w as it lies (dfp_weights_plain) */
  int b_in_tasks;                 /* backward-weights with small sums: each task packs its own B K
                                   * blocks and runs every row block on them (conv_run), no bpack */
  size_t m, n, k;                 /* the per-group GEMM */
  size_t kpairs, kc, kblocks;     /* kc: pairs per K block (dfp_kc_pairs) */
  size_t mcp, ncp;                /* micro-panels per cache block */
  size_t mblocks, nblocks, npanels;
  size_t ksplit;                  /* backward: K ranges of each round, summed after the fact */
  size_t round_kb0, round_kblocks;  /* the K blocks packed in bpack now (all, in one round) */
  size_t bkblocks, bkpairs;         /* K blocks and pairs bpack holds per panel */
  size_t bpanel_stride;             /* elements from one B panel to the next (dfp_panel_stride) */
  int16_t* bpack;                 /* [groups][npanels][bkpairs][NR][2], panels bpanel_stride apart */
  uint64_t* bbound;               /* [groups][npanels][bkblocks][DFP_CHUNK_LEVELS] */
  int64_t* sums;                  /* with several rounds or K ranges (needs_sums):
                                   * [ksplit][groups][mblocks * mcp * MR][npanels * NR] */
  int status;
} conv_plan;

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }
static size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

/* w as it lies [taps * cin][groups * cout] or dy [pixels][groups * cout]: K rows [k0, k1), B
 * panels [q0, q1) of group g's columns, at dst with panels panel_stride apart and their bounds
 * bounds_stride apart. */
static void pack_plain_b(conv_plan* c, size_t g, size_t q0, size_t q1, size_t k0, size_t k1, int16_t* dst,
                         size_t panel_stride, uint64_t* bounds, size_t bounds_stride) {
  const dfp_conv_shape* s = &c->args->shape;
  const size_t channels = s->groups * s->cout;
  if (dfp_pack_panels(c->cfg, c->args->b + k0 * channels + g * s->cout, c->n, k1 - k0, c->kc, 1, channels,
                      q0 * (size_t)c->nr, c->nr, q1 - q0, dst, panel_stride, bounds, bounds_stride))
    dfp_fail(&c->status, DFP_ERR_BAD_MANTISSA);
}

/* Packs K blocks [kb0, kb1) of the round (indices within it) of B panels [q0, q1) of group g. */
static void pack_b_panels(conv_plan* c, size_t g, size_t q0, size_t q1, size_t kb0, size_t kb1) {
  const dfp_conv_shape* s = &c->args->shape;
  const int nr = c->nr;
  const size_t t = g * c->npanels + q0;
  const size_t k0 = (c->round_kb0 + kb0) * 2 * c->kc;
  const size_t k1 = min_size(c->k, (c->round_kb0 + kb1) * 2 * c->kc);
  const size_t panel_stride = c->bpanel_stride, bounds_stride = c->bkblocks * DFP_CHUNK_LEVELS;
  int16_t* dst = c->bpack + t * panel_stride + kb0 * c->kc * nr * 2;
  uint64_t* bounds = c->bbound + t * bounds_stride + kb0 * DFP_CHUNK_LEVELS;
  if (!c->plain_weights) { /* forward, all of K in one round: w through its view of b */
    for (size_t q = q0; q < q1; ++q, dst += panel_stride, bounds += bounds_stride)
      if (dfp_pack_weights_panel(c->cfg, c->args->b, s, &c->args->weights, g, q * nr, nr, c->kc, dst, bounds))
        dfp_fail(&c->status, DFP_ERR_BAD_MANTISSA);
    return;
  }
  pack_plain_b(c, g, q0, q1, k0, k1, dst, panel_stride, bounds, bounds_stride);
}

/* Forward: B panel t (group-major) over all of K. */
static void pack_b_task(void* arg, size_t t) {
  conv_plan* c = (conv_plan*)arg;
  pack_b_panels(c, t / c->npanels, t % c->npanels, t % c->npanels + 1, 0, c->round_kblocks);
}

/* Backward-weights: all the panels of K block kb of the round of group g, kb fastest: each
 * block's dy rows are read once, in order; a task per panel over the whole round would stream
 * the round (megabytes) once per panel. */
static void pack_b_kblock_task(void* arg, size_t t) {
  conv_plan* c = (conv_plan*)arg;
  const size_t kb = t % c->round_kblocks, g = t / c->round_kblocks;
  pack_b_panels(c, g, 0, c->npanels, kb, kb + 1);
}

/* Stores (or with accumulate, adds) the sum of K blocks [kb0, kb1) of the round of the cache
 * blocks of row blocks [mb0, mb1) and column block nb of group g in acc (row mb0 * mcp * MR of
 * the sums, row stride ldc); or, given out (then [kb0, kb1) is the whole reduction, one K block,
 * and the row blocks one), encodes it there. With B packed in the task, each K block of B is
 * packed once for all the row blocks. */
static void run_block(conv_plan* c, size_t g, size_t mb0, size_t mb1, size_t nb, size_t kb0, size_t kb1,
                      int64_t* acc, size_t ldc, int accumulate, const dfp_block_output* out) {
  const dfp_conv_args* a = c->args;
  const int mr = c->mr, nr = c->nr;
  const dfp_patches patches = {a->x, &a->shape, g * a->shape.cin};
  const size_t q0 = nb * c->ncp, q1 = min_size(q0 + c->ncp, c->npanels);
  const size_t panel_stride = dfp_panel_stride(c->kc * mr * 2);
  int16_t* apack = (int16_t*)dfp_scratch(DFP_SCRATCH_A_PANELS, c->mcp * panel_stride * sizeof(int16_t));
  uint64_t abound[DFP_IM2COL_MAX_ROWS * DFP_CHUNK_LEVELS];
  if (apack == NULL) {
    dfp_fail(&c->status, DFP_ERR_ALLOC);
    return;
  }
  /* B: this K block of the round's bpack, or packed here into a block of this task's own. */
  const size_t bq0 = g * c->npanels + q0, bpanels = q1 - q0;
  const size_t own_stride = dfp_panel_stride(c->kc * nr * 2);
  int16_t* own = NULL;
  uint64_t* own_bounds = NULL;
  if (c->b_in_tasks) {
    own = (int16_t*)dfp_scratch(DFP_SCRATCH_B_PANELS, bpanels * (own_stride * sizeof(int16_t) +
                                                                 DFP_CHUNK_LEVELS * sizeof(uint64_t)));
    if (own == NULL) {
      dfp_fail(&c->status, DFP_ERR_ALLOC);
      return;
    }
    own_bounds = (uint64_t*)(own + bpanels * own_stride);
  }
  for (size_t kb = kb0; kb < kb1; ++kb) {
    const size_t k0 = kb * 2 * c->kc, k1 = min_size(k0 + 2 * c->kc, c->k);
    const size_t kc = (k1 - k0 + 1) / 2;
    dfp_block block = {.abound = abound, .abound_stride = DFP_CHUNK_LEVELS, .npanels = bpanels, .kpairs = kc};
    if (own != NULL) {
      pack_plain_b(c, g, q0, q1, k0, k1, own, own_stride, own_bounds, DFP_CHUNK_LEVELS);
      block.b = own, block.b_stride = own_stride;
      block.bbound = own_bounds, block.bbound_stride = DFP_CHUNK_LEVELS;
    } else {
      const size_t bkb = kb - c->round_kb0;
      block.b = c->bpack + bq0 * c->bpanel_stride + bkb * c->kc * nr * 2, block.b_stride = c->bpanel_stride;
      block.bbound = c->bbound + (bq0 * c->bkblocks + bkb) * DFP_CHUNK_LEVELS;
      block.bbound_stride = c->bkblocks * DFP_CHUNK_LEVELS;
    }
    for (size_t mb = mb0; mb < mb1; ++mb) {
      const size_t row0 = mb * c->mcp * mr;
      const size_t panels = min_size(c->mcp, ceil_div(c->m - row0, mr));
      if (c->backward)
        dfp_im2col_pack_taps(c->cfg, &patches, c->m, row0, mr, panels, k0, k1, apack, panel_stride);
      else
        dfp_im2col_pack_pixels(c->cfg, &patches, c->m, row0, mr, panels, k0, k1, apack, panel_stride);
      for (size_t p = 0; p < panels; ++p)
        if (dfp_block_bounds(c->cfg, apack + p * panel_stride, kc, mr, abound + p * DFP_CHUNK_LEVELS))
          dfp_fail(&c->status, DFP_ERR_BAD_MANTISSA);
      block.a = apack, block.a_stride = panel_stride, block.mpanels = panels;
      if (out != NULL)
        dfp_multiply_encode_block(c->cfg, &block, out);
      else
        dfp_multiply_block(c->cfg, &block, acc + (row0 - mb0 * c->mcp * mr) * ldc, ldc, accumulate || kb > kb0);
    }
  }
}

/* One cache block over all of K, encoded: the forward pass, and backward-weights in one round
 * of one K range (no sums). A reduction of one K block (K <= 576: the 1x1 layers on up to 576
 * channels, the 3x3 layers on 64, the stem; a sharded batch's weight gradients of the deep
 * layers) into float32 or int64 is written tile by tile as it is computed
 * (dfp_multiply_encode_block), others through an int64 block of sums. */
static void block_task(void* arg, size_t t) {
  conv_plan* c = (conv_plan*)arg;
  const dfp_conv_args* a = c->args;
  const dfp_conv_shape* s = &a->shape;
  const int mr = c->mr, nr = c->nr;
  const size_t per_group = c->mblocks * c->nblocks;
  const size_t g = t / per_group, mb = t % per_group / c->nblocks, nb = t % c->nblocks;
  const size_t ldc = (min_size(c->ncp * (nb + 1), c->npanels) - c->ncp * nb) * nr; /* this block's columns */
  const size_t row0 = mb * c->mcp * mr, row1 = min_size(row0 + c->mcp * mr, c->m);
  const size_t col0 = nb * c->ncp * nr, cols = min_size(ldc, c->n - col0);
  const size_t pixels_per_image = s->out[0] * s->out[1] * s->out[2], ldo = s->groups * s->cout;
  int32_t ea[DFP_IM2COL_MAX_ROWS]; /* a block's rows: at most CONV_MC_ROWS or DFP_IM2COL_MAX_ROWS */
  /* Rows are pixels where the exponents are per image (forward); backward-weights' are taps and
   * channels, over a reduction that may have no pixels at all (an empty output's gradient). */
  for (size_t row = row0; row < row1; ++row)
    ea[row - row0] = a->ex[a->ex_batch_stride ? row / pixels_per_image * a->ex_batch_stride : 0];
  if (c->kblocks == 1 && dfp_encodes_tiles(c->cfg, a->out.format, 0)) {
    const dfp_block_output out = {&a->out, row0 * ldo + g * s->cout + col0, ldo, row1 - row0, cols, ea, a->eb,
                                  dfp_stream_output(c->m * ldo * sizeof(float))};
    run_block(c, g, mb, mb + 1, nb, 0, 1, NULL, 0, 0, &out);
    return;
  }
  const size_t bytes = c->mcp * mr * ldc * sizeof(int64_t);
  int64_t* acc = (int64_t*)dfp_scratch(DFP_SCRATCH_SUMS, bytes);
  if (acc == NULL) {
    dfp_fail(&c->status, DFP_ERR_ALLOC);
    return;
  }
  if (c->kblocks == 0) memset(acc, 0, bytes);
  run_block(c, g, mb, mb + 1, nb, 0, c->kblocks, acc, ldc, 0, NULL);
  for (size_t row = row0; row < row1; ++row)
    dfp_encode_row(c->cfg, &a->out, row * ldo + g * s->cout + col0, acc + (row - row0) * ldc, cols,
                   ea[row - row0], &a->eb, 0);
}

static size_t sums_rows(const conv_plan* c) { return c->mblocks * c->mcp * c->mr; }

/* Whether the cache blocks sum several rounds or K ranges, or pack their own B: only then do they
 * need the sums. */
static int needs_sums(const conv_plan* c) { return c->b_in_tasks || c->bkblocks < c->kblocks || c->ksplit > 1; }

/* Sets bpack's rounds of bkblocks K blocks and, for backward-weights with fewer tasks a K range
 * (its cache blocks, or with B packed in the tasks its column blocks) than TASKS_PER_THREAD per
 * thread (the stem, the 56x56 and 28x28 layers), splits each round's long pixel reduction
 * into K ranges across threads: ranges of equal length (within a K block; a round of several
 * is a whole number of ranges), so many that the tasks (ranges x tasks a range) are a
 * multiple of the thread count where a round has the K blocks for it, so that
 * the threads end a round together (ranges of ceiling length with a short last one, and 9
 * tasks for 2 threads, idled a thread for 5-10% of the stem's and the 3x3 layers' weight
 * gradients). Returns the bytes of bpack and sums this takes. */
static size_t plan_rounds(conv_plan* c, size_t bkblocks, size_t tasks, size_t bpanels, int threads) {
  c->ksplit = 1;
  if (c->backward && bkblocks > 1) {
    c->ksplit = min_size(ceil_div(TASKS_PER_THREAD * (size_t)threads, tasks), bkblocks);
    while (c->ksplit < bkblocks && c->ksplit * tasks % (size_t)threads != 0) ++c->ksplit;
    if (bkblocks < c->kblocks) bkblocks -= bkblocks % c->ksplit; /* rounds of whole ranges */
  }
  c->bkblocks = bkblocks;
  c->bkpairs = min_size(c->kpairs, bkblocks * c->kc);
  c->bpanel_stride = dfp_panel_stride(c->bkpairs * c->nr * 2);
  const size_t sums = c->ksplit * c->args->shape.groups * sums_rows(c) * c->npanels * c->nr;
  return bpanels * c->bpanel_stride * sizeof(int16_t) + (needs_sums(c) ? sums * sizeof(int64_t) : 0);
}

/* The row blocks of a backward-weights task: all of them where it packs its own B, else one. */
static size_t task_mblocks(const conv_plan* c) { return c->b_in_tasks ? c->mblocks : 1; }

static void backward_task(void* arg, size_t t) {
  conv_plan* c = (conv_plan*)arg;
  const size_t rows = task_mblocks(c), groups = c->args->shape.groups;
  const size_t per_group = c->mblocks / rows * c->nblocks;
  const size_t ks = t / (groups * per_group), rest = t % (groups * per_group);
  const size_t g = rest / per_group, mb = rest % per_group / c->nblocks * rows, nb = rest % c->nblocks;
  const size_t ldc = c->npanels * c->nr;
  int64_t* acc = c->sums + ((ks * groups + g) * sums_rows(c) + mb * c->mcp * c->mr) * ldc +
                 nb * c->ncp * c->nr;
  /* Every range of the first round, which is whole (ksplit <= bkblocks), stores its sums. */
  const size_t kb0 = c->round_kb0 + ks * c->round_kblocks / c->ksplit;
  const size_t kb1 = c->round_kb0 + (ks + 1) * c->round_kblocks / c->ksplit;
  if (kb0 < kb1) run_block(c, g, mb, mb + rows, nb, kb0, kb1, acc, ldc, c->round_kb0 > 0, NULL);
}

/* Sums the K ranges of one row block of one group and writes its weight gradient rows. */
static void backward_encode_task(void* arg, size_t t) {
  conv_plan* c = (conv_plan*)arg;
  const dfp_conv_args* a = c->args;
  const dfp_conv_shape* s = &a->shape;
  const size_t g = t / c->mblocks, mb = t % c->mblocks;
  const size_t ldc = c->npanels * c->nr, split_stride = s->groups * sums_rows(c) * ldc;
  const size_t row0 = mb * c->mcp * c->mr, row1 = min_size(row0 + c->mcp * c->mr, c->m);
  for (size_t row = row0; row < row1; ++row) {
    int64_t* sum = c->sums + (g * sums_rows(c) + row) * ldc;
    for (size_t ks = 1; ks < c->ksplit; ++ks)
      for (size_t j = 0; j < c->n; ++j) sum[j] += sum[ks * split_stride + j];
    dfp_encode_row(c->cfg, &a->out, row * s->groups * s->cout + g * s->cout, sum, c->n,
                   a->ex[0], &a->eb, 0);
  }
}

static int valid_shape(const dfp_conv_args* a, int backward) {
  const dfp_conv_shape* s = &a->shape;
  for (int d = 0; d < 3; ++d)
    if (s->stride[d] < 1 || s->lhs_dil[d] < 1 || s->rhs_dil[d] < 1) return 0;
  return s->groups >= 1 && !(backward && a->ex_batch_stride != 0);
}

/* dfp_plan_init (macro.h), then the shape check of a convolution plan. */
static int conv_plan_init(const dfp_conv_args* args, int backward, dfp_isa isa, const dfp_parallel** par,
                          const dfp_isa_config** cfg, int* mr, int* nr) {
  const int status = dfp_plan_init(isa, par, cfg, mr, nr);
  if (status != DFP_OK) return status;
  return valid_shape(args, backward) ? DFP_OK : DFP_ERR_BAD_SHAPE;
}

static int conv_run(const dfp_conv_args* args, int backward, dfp_isa isa, const dfp_parallel* par) {
  conv_plan c;
  memset(&c, 0, sizeof c);
  const int status = conv_plan_init(args, backward, isa, &par, &c.cfg, &c.mr, &c.nr);
  if (status != DFP_OK) return status;
  c.args = args;
  const dfp_conv_shape* s = &args->shape;
  c.backward = backward;
  c.plain_weights = backward || dfp_weights_plain(s, &args->weights);
  const int mr = c.mr, nr = c.nr;
  const size_t taps = s->window[0] * s->window[1] * s->window[2];
  const size_t pixels = s->batch * s->out[0] * s->out[1] * s->out[2];
  c.m = backward ? taps * s->cin : pixels;
  c.k = backward ? pixels : taps * s->cin;
  c.n = s->cout;
  if (dfp_check_output(&args->out, c.k) != DFP_OK) return DFP_ERR_BAD_SHAPE;
  if (c.m == 0 || c.n == 0) return DFP_OK;
  c.kpairs = (c.k + 1) / 2;
  c.kc = dfp_kc_pairs(c.kpairs);
  c.kblocks = dfp_kc_blocks(c.kpairs, c.kc);
  c.npanels = ceil_div(c.n, nr);
  if (backward) {
    /* The taps view's rows are x's channels (times taps): each row block reads its slice of
     * every pixel of x again, so the blocks are as tall as one pack allows, of even heights
     * (a 256-channel 1x1 layer: two blocks of 132 and 124 rows, not 66, 66, 66 and 58). */
    const size_t panels = ceil_div(c.m, mr);
    c.mcp = ceil_div(panels, ceil_div(panels, DFP_IM2COL_MAX_ROWS / (size_t)mr));
  } else {
    c.mcp = ceil_div(CONV_MC_ROWS, mr);
  }
  c.ncp = ceil_div(CONV_NC_COLS, nr);
  c.mblocks = ceil_div(ceil_div(c.m, mr), c.mcp);
  c.nblocks = ceil_div(c.npanels, c.ncp);
  const size_t blocks = s->groups * c.mblocks * c.nblocks, bpanels = s->groups * c.npanels;
  const int threads = par->num_threads > 0 ? par->num_threads : 1;
  /* Backward-weights whose sums over all the row blocks of a column block fit
   * CONV_TASK_SUMS_BYTES (the stem, the 1x1 layers on 64 and 128 channels and the one from 256
   * to 64, the 3x3 layer on 64; not the 1x1 from 256 to 1024: 264 x 256 sums) uses each K
   * block of dy in one task only: its tasks, K ranges of a column block, pack their own as
   * they go, into the cache, and run every row block on it, instead of rounds of dy packed
   * into bpack first (written out and read back, and a wait for all threads twice a
   * round). Zen 3, two threads, CPU time with the waits (minima of six alternations): the stem
   * 11% less, conv2_1x1_expand 7%, conv3_1x1_expand 18%, one thread about 1%; of several row
   * blocks, wall time: conv2_1x1_reduce and conv2_3x3 2-5% less (docs/performance.md). */
  const size_t block_cols = min_size(c.ncp, c.npanels) * nr;
  c.b_in_tasks = backward && c.kblocks > 1 &&
                 sums_rows(&c) * block_cols * sizeof(int64_t) <= CONV_TASK_SUMS_BYTES;
  const size_t tasks = s->groups * (c.mblocks / task_mblocks(&c)) * c.nblocks; /* per K range */
  const size_t whole = plan_rounds(&c, c.kblocks, tasks, bpanels, threads);
  if (backward && !c.b_in_tasks) { /* rounds of whole K blocks, at least one, where they take less memory */
    const size_t round = min_size(c.kblocks, CONV_ROUND_BYTES / (bpanels * nr * 2 * c.kc * sizeof(int16_t)) + 1);
    if (plan_rounds(&c, round, tasks, bpanels, threads) >= whole) plan_rounds(&c, c.kblocks, tasks, bpanels, threads);
  }
  const int sums = needs_sums(&c);
  dfp_advise_output(args->out.data, c.m * s->groups * s->cout * dfp_out_element_bytes(args->out.format));
  if (!c.b_in_tasks) {
    c.bpack = (int16_t*)malloc(bpanels * c.bpanel_stride * sizeof(int16_t));
    c.bbound = (uint64_t*)malloc(bpanels * (c.bkblocks ? c.bkblocks : 1) * DFP_CHUNK_LEVELS * sizeof(uint64_t));
  }
  /* Not zeroed: every K range of the first round, which is whole, stores its sums. */
  if (sums) c.sums = (int64_t*)malloc(c.ksplit * s->groups * sums_rows(&c) * c.npanels * nr * sizeof(int64_t));
  if ((!c.b_in_tasks && (!c.bpack || !c.bbound)) || (sums && !c.sums)) {
    c.status = DFP_ERR_ALLOC;
  } else if (!sums) {
    c.round_kblocks = c.kblocks;
    if (backward)
      par->parallel_for(par->pool, s->groups * c.kblocks, pack_b_kblock_task, &c);
    else
      par->parallel_for(par->pool, bpanels, pack_b_task, &c);
    if (c.status == DFP_OK) par->parallel_for(par->pool, blocks, block_task, &c);
  } else {
    for (; c.round_kb0 < c.kblocks && c.status == DFP_OK; c.round_kb0 += c.bkblocks) {
      c.round_kblocks = min_size(c.bkblocks, c.kblocks - c.round_kb0);
      if (!c.b_in_tasks) par->parallel_for(par->pool, s->groups * c.round_kblocks, pack_b_kblock_task, &c);
      if (c.status == DFP_OK) par->parallel_for(par->pool, c.ksplit * tasks, backward_task, &c);
    }
    if (c.status == DFP_OK) par->parallel_for(par->pool, s->groups * c.mblocks, backward_encode_task, &c);
  }
  free(c.bpack);
  free(c.bbound);
  free(c.sums);
  return c.status;
}

/* Backward-data by col2im: per image and group, cols[p, (t,c)] = sum_o dy[p, o] * w[(t,c), o]
 * is one GEMM with dy as A (read as it lies) and the weights as B, and each column is added,
 * exactly in int64, into the input pixel its tap reads. With few input channels (a stem's 3)
 * this beats a forward convolution of dy, whose packed patches would each serve only cin
 * output columns. Each image sums into an int64 dx of its own (a stem's 1.2 MB, not the
 * batch's 38 MB at batch 32, which glibc would map and zero-fill afresh on every call). */
typedef struct {
  const dfp_conv_args* args;
  const dfp_isa_config* cfg;
  int mr, nr;
  size_t pixels, taps;            /* output pixels per image; window taps */
  size_t n, k, kpairs, kc, kblocks, npanels; /* the GEMM: N = taps * cin, K = cout */
  dfp_unit_shape units;           /* the columns' units (im2col.h) */
  size_t unit_count;
  size_t* unit_offsets;           /* [unit_count]: from a window's origin to each unit's first
                                   * element in dx, for windows inside the input */
  int16_t* bpack;                 /* [groups][npanels][kpairs][NR][2] */
  uint64_t* bbound;
  int status;
} col2im_plan;

static void col2im_pack_b_task(void* arg, size_t t) {
  col2im_plan* c = (col2im_plan*)arg;
  const dfp_conv_shape* s = &c->args->shape;
  const size_t g = t / c->npanels, q = t % c->npanels;
  const int nr = c->nr;
  /* Row (tap, c) of W^T is w[tap][c][g * cout + o] over o: w row-major, or features-major
   * (dfp_weight_view), w[g * cout + o][tap][c]. */
  const size_t o_stride = c->args->weights.features_major ? c->n : 1;
  const size_t row_stride = c->args->weights.features_major ? 1 : s->groups * s->cout;
  if (dfp_pack_panel(c->cfg, c->args->b + g * s->cout * o_stride, c->n, c->k, c->kc, row_stride, o_stride, q * nr, nr,
                     c->bpack + t * c->kpairs * nr * 2, c->bbound + t * c->kblocks * DFP_CHUNK_LEVELS))
    dfp_fail(&c->status, DFP_ERR_BAD_MANTISSA);
}

/* Adds n sums from element first of row `row` of a row block's sums (int32 or int64, ldc a row)
 * into dx at each of `runs` offsets, n after n (the path's add_runs). */
static void add_sums(const col2im_plan* c, int s32, const int64_t* acc, size_t ldc, size_t row, size_t first,
                     int64_t* dx, const size_t* offsets, size_t n, size_t runs) {
  if (s32)
    c->cfg->add_runs_s32(dx, offsets, (const int32_t*)acc + row * ldc + first, n, runs);
  else
    c->cfg->add_runs(dx, offsets, acc + row * ldc + first, n, runs);
}

/* Group g of one image: the GEMM of dy's rows with the weights, per row block into acc
 * (buffers of mcp panels), each column added into the image's dx [input pixels][groups * cin].
 * One K block (cout <= 576) whose sums fit int32, as they do but for near full-scale mantissas,
 * is summed into int32 (dfp_multiply_block_s32): the stem's tiles over 32 pairs spent a tenth of
 * their time widening and storing int64 sums. */
static void col2im_group(col2im_plan* c, size_t image, size_t g, int16_t* apack, uint64_t* abound, int64_t* acc,
                         int64_t* dx) {
  const dfp_conv_shape* s = &c->args->shape;
  const int mr = c->mr, nr = c->nr;
  const size_t mcp = ceil_div(CONV_MC_ROWS, mr), ldc = c->npanels * nr, levels = c->kblocks * DFP_CHUNK_LEVELS;
  const size_t kp = c->kpairs ? c->kpairs : 1;
  const size_t channels_out = s->groups * s->cout, channels_in = s->groups * s->cin;
  const size_t run_stride = dfp_run_stride(s);
  const dfp_unit_shape units = c->units;
  const int16_t* dy = c->args->x + image * c->pixels * channels_out + g * s->cout;
  int64_t* group_dx = dx + g * s->cin;
  for (size_t row0 = 0; row0 < c->pixels; row0 += mcp * mr) {
    const size_t panels = min_size(mcp, ceil_div(c->pixels - row0, mr));
    for (size_t p = 0; p < panels; ++p)
      if (dfp_pack_panel(c->cfg, dy, c->pixels, c->k, c->kc, channels_out, 1, row0 + p * mr, mr,
                         apack + p * kp * mr * 2, abound + p * levels))
        dfp_fail(&c->status, DFP_ERR_BAD_MANTISSA);
    const dfp_block block0 = {
        .a = apack, .a_stride = kp * mr * 2, .mpanels = panels,
        .abound = abound, .abound_stride = levels,
        .b = c->bpack + g * c->npanels * c->kpairs * nr * 2, .b_stride = c->kpairs * nr * 2,
        .npanels = c->npanels,
        .bbound = c->bbound + g * c->npanels * c->kblocks * DFP_CHUNK_LEVELS,
        .bbound_stride = c->kblocks * DFP_CHUNK_LEVELS,
        .kpairs = min_size(c->kpairs, c->kc)};
    const int s32 = c->kblocks == 1 && c->cfg->add_runs_s32 != NULL &&
                    dfp_multiply_block_s32(c->cfg, &block0, (int32_t*)acc, ldc);
    if (c->kblocks == 0) memset(acc, 0, panels * mr * ldc * sizeof(int64_t));
    for (size_t kb = 0; kb < c->kblocks && !s32; ++kb) {
      dfp_block block = block0;
      block.a += kb * c->kc * mr * 2;
      block.abound += kb * DFP_CHUNK_LEVELS;
      block.b += kb * c->kc * nr * 2;
      block.bbound += kb * DFP_CHUNK_LEVELS;
      block.kpairs = min_size(c->kpairs - kb * c->kc, c->kc);
      dfp_multiply_block(c->cfg, &block, acc, ldc, kb > 0);
    }
    const size_t row1 = min_size(row0 + panels * mr, c->pixels);
    size_t pos[3], image_index = 0; /* the pixel's position, stepped (dfp_next_pixel), not divided out */
    dfp_split_pixel(s, row0, pos);
    for (size_t row = row0; row < row1;) {
      const int64_t origin = dfp_window_origin(s, 0, pos); /* within the image */
      if (origin >= 0) { /* a run of whole windows along the output row: every unit at its offset,
                          * one call a pixel, the origin stepped (the loop that found it pixel by
                          * pixel took 5% of the stem's kernel) */
        const size_t run = dfp_inside_run(s, pos, row1 - row);
        for (size_t q = 0; q < run; ++q)
          add_sums(c, s32, acc, ldc, row - row0 + q, 0, group_dx + (size_t)origin * channels_in + q * run_stride,
                   c->unit_offsets, units.elements, c->unit_count);
        dfp_skip_run(s, run, &image_index, pos);
        row += run;
        continue;
      }
      /* A unit's taps [lo, hi) add into consecutive input pixels (im2col.h). */
      size_t t[3] = {0, 0, 0}, lo, hi;
      const size_t no_offset = 0;
      dfp_unit_taps(s, &units, pos, &lo, &hi);
      for (size_t tap = 0; tap < c->taps && lo < hi; tap += units.taps, dfp_next_unit(s, &units, t)) {
        const size_t first[3] = {t[0], t[1], t[2] + lo};
        const int64_t pixel = dfp_input_pixel(s, 0, pos, first);
        if (pixel >= 0)
          add_sums(c, s32, acc, ldc, row - row0, (tap + lo) * s->cin, group_dx + (size_t)pixel * channels_in,
                   &no_offset, (hi - lo) * s->cin, 1);
      }
      dfp_next_pixel(s, &image_index, pos);
      ++row;
    }
  }
}

/* One image: every group's columns summed into an exact dx of its own, then encoded as one row
 * (contiguous, one exponent). Images are tasks of their own, so no two tasks touch one pixel. */
static void col2im_task(void* arg, size_t image) {
  col2im_plan* c = (col2im_plan*)arg;
  const dfp_conv_args* a = c->args;
  const dfp_conv_shape* s = &a->shape;
  const size_t mcp = ceil_div(CONV_MC_ROWS, c->mr), levels = c->kblocks * DFP_CHUNK_LEVELS;
  const size_t elements = s->in[0] * s->in[1] * s->in[2] * s->groups * s->cin;
  int16_t* apack = (int16_t*)dfp_scratch(DFP_SCRATCH_A_PANELS, mcp * (c->kpairs ? c->kpairs : 1) * c->mr * 2 * sizeof(int16_t));
  uint64_t* abound = (uint64_t*)dfp_scratch(DFP_SCRATCH_A_BOUNDS, mcp * (levels ? levels : 1) * sizeof(uint64_t));
  int64_t* acc = (int64_t*)dfp_scratch(DFP_SCRATCH_SUMS, mcp * c->mr * (c->npanels ? c->npanels : 1) * c->nr * sizeof(int64_t));
  int64_t* dx = (int64_t*)calloc(elements, sizeof(int64_t));
  if (!apack || !abound || !acc || !dx) {
    dfp_fail(&c->status, DFP_ERR_ALLOC);
  } else {
    for (size_t g = 0; g < s->groups && c->n > 0; ++g) col2im_group(c, image, g, apack, abound, acc, dx);
    dfp_encode_row(c->cfg, &a->out, image * elements, dx, elements, a->ex[0], &a->eb, 0);
  }
  free(dx);
}

int dfp_conv_backward_data(const dfp_conv_args* args, dfp_isa isa, const dfp_parallel* par) {
  col2im_plan c;
  memset(&c, 0, sizeof c);
  const int status = conv_plan_init(args, 1, isa, &par, &c.cfg, &c.mr, &c.nr);
  if (status != DFP_OK) return status;
  c.args = args;
  const dfp_conv_shape* s = &args->shape;
  const int nr = c.nr;
  c.pixels = s->out[0] * s->out[1] * s->out[2];
  c.taps = s->window[0] * s->window[1] * s->window[2];
  c.n = c.taps * s->cin;
  c.k = s->cout;
  c.kpairs = (c.k + 1) / 2;
  c.kc = dfp_kc_pairs(c.kpairs);
  c.kblocks = dfp_kc_blocks(c.kpairs, c.kc);
  c.npanels = ceil_div(c.n, nr);
  if (dfp_check_output(&args->out, c.taps * c.k) != DFP_OK) return DFP_ERR_BAD_SHAPE; /* taps reaching a pixel */
  c.units = dfp_units_of(s);
  c.unit_count = c.taps / c.units.taps;
  const size_t in_elements = s->batch * s->in[0] * s->in[1] * s->in[2] * s->groups * s->cin;
  if (in_elements == 0) return DFP_OK;
  const size_t bpanels = s->groups * c.npanels;
  dfp_advise_output(args->out.data, in_elements * dfp_out_element_bytes(args->out.format));
  c.bpack = (int16_t*)malloc((bpanels ? bpanels : 1) * (c.kpairs ? c.kpairs : 1) * nr * 2 * sizeof(int16_t));
  c.bbound = (uint64_t*)malloc((bpanels ? bpanels : 1) * (c.kblocks ? c.kblocks : 1) * DFP_CHUNK_LEVELS * sizeof(uint64_t));
  c.unit_offsets = (size_t*)malloc((c.unit_count ? c.unit_count : 1) * sizeof(size_t));
  if (!c.bpack || !c.bbound || !c.unit_offsets) {
    c.status = DFP_ERR_ALLOC;
  } else {
    size_t t[3] = {0, 0, 0};
    for (size_t u = 0; u < c.unit_count; ++u, dfp_next_unit(s, &c.units, t))
      c.unit_offsets[u] = dfp_tap_offset(s, t) * s->groups * s->cin;
    par->parallel_for(par->pool, bpanels, col2im_pack_b_task, &c);
    if (c.status == DFP_OK) par->parallel_for(par->pool, s->batch, col2im_task, &c);
  }
  free(c.bpack);
  free(c.bbound);
  free(c.unit_offsets);
  return c.status;
}

int dfp_conv_forward(const dfp_conv_args* args, dfp_isa isa, const dfp_parallel* par) {
  return conv_run(args, 0, isa, par);
}

int dfp_conv_backward_weights(const dfp_conv_args* args, dfp_isa isa, const dfp_parallel* par) {
  return conv_run(args, 1, isa, par);
}
