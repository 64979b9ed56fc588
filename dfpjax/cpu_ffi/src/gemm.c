/* Macro-loop of the exact DFP GEMM: per round of the batch, pack, run the block routine
 * (macro.h) over cache blocks in parallel, encode the exact sums (spec section 3). Large single
 * products that conv.c's loops serve better run there, as 1x1 convolutions (run_as_convolution). */
#include <stdlib.h>
#include <string.h>

#include "dfp_kernel.h"
#include "isa_config.h"
#include "macro.h"
#include "pack.h"

enum {
  GEMM_MC_ROWS = 64,   /* rows of a cache block, rounded up to whole micro-panels */
  GEMM_NC_COLS = 128,  /* columns of a cache block */
  GEMM_PACK_BYTES = 8 << 20, /* packed operands a round of the batch holds; a single product past
                               * it may run as a convolution */
  GEMM_PACK_PANELS = 8,      /* micro-panels a pack task fills */
};

typedef struct {
  const dfp_gemm_args* args;
  const dfp_isa_config* cfg;
  int mr, nr;
  size_t kpairs, kc, kblocks;      /* kc: pairs per K block (dfp_kc_pairs) */
  size_t mpanels, npanels;         /* per batch element */
  size_t mcp, ncp;                 /* micro-panels per cache block */
  size_t mblocks, nblocks;         /* cache blocks per batch element */
  size_t batch0;                   /* the round's first batch element */
  int16_t* apack;                  /* [round's batch][mpanels][kpairs][MR][2] */
  int16_t* bpack;                  /* [round's batch][npanels][kpairs][NR][2] */
  uint64_t* abound;                /* [round's batch][mpanels][kblocks][DFP_CHUNK_LEVELS] */
  uint64_t* bbound;
  int status;                      /* first error seen by any task, DFP_OK if none */
} gemm_plan;

/* The pack tasks of one operand's `panels` micro-panels per batch element: groups of
 * GEMM_PACK_PANELS, so that a k-major operand's K rows are each read once for the group's
 * columns, not once per micro-panel (12 or 32 bytes of each row's cache lines a pass). */
static size_t pack_groups(size_t panels) { return (panels + GEMM_PACK_PANELS - 1) / GEMM_PACK_PANELS; }

/* Packs group t (batch-major) of the round of an operand of `rows` rows of K (row stride rs,
 * column stride cs) into micro-panels of r rows, for A and B alike. */
static void pack_operand(gemm_plan* g, size_t t, const int16_t* operand, size_t rows, size_t panels,
                         size_t rs, size_t cs, int r, int16_t* pack, uint64_t* bound) {
  const size_t k = g->args->k, groups = pack_groups(panels);
  const size_t panel0 = t % groups * GEMM_PACK_PANELS, first = t / groups * panels + panel0;
  const size_t count = panels - panel0 < GEMM_PACK_PANELS ? panels - panel0 : GEMM_PACK_PANELS;
  const size_t b = g->batch0 + t / groups, panel_stride = g->kpairs * r * 2;
  if (dfp_pack_panels(g->cfg, operand + b * rows * k, rows, k, g->kc, rs, cs, panel0 * r, r, count,
                      pack + first * panel_stride, panel_stride, bound + first * g->kblocks * DFP_CHUNK_LEVELS,
                      g->kblocks * DFP_CHUNK_LEVELS))
    dfp_fail(&g->status, DFP_ERR_BAD_MANTISSA);
}

static void pack_a_task(void* arg, size_t t) {
  gemm_plan* g = (gemm_plan*)arg;
  const dfp_gemm_args* a = g->args;
  pack_operand(g, t, a->a, a->m, g->mpanels, a->a_kmajor ? 1 : a->k, a->a_kmajor ? a->m : 1, g->mr, g->apack,
               g->abound);
}

static void pack_b_task(void* arg, size_t t) {
  gemm_plan* g = (gemm_plan*)arg;
  const dfp_gemm_args* a = g->args;
  pack_operand(g, t, a->b, a->n, g->npanels, a->b_nmajor ? a->k : 1, a->b_nmajor ? 1 : a->n, g->nr, g->bpack,
               g->bbound);
}

/* One cache block of the round: micro-panels [p0, p1) x [q0, q1) of batch element b. */
static void block_task(void* arg, size_t t) {
  gemm_plan* g = (gemm_plan*)arg;
  const dfp_gemm_args* a = g->args;
  const size_t mr = (size_t)g->mr, nr = (size_t)g->nr;
  const size_t ldc = g->ncp * nr; /* the block accumulator is row-major [mcp * mr][ldc] */
  const size_t per_batch = g->mblocks * g->nblocks;
  const size_t round_b = t / per_batch, b = g->batch0 + round_b;
  const size_t ib = (t % per_batch) / g->nblocks, jb = t % g->nblocks;
  const size_t p0 = ib * g->mcp, p1 = p0 + g->mcp < g->mpanels ? p0 + g->mcp : g->mpanels;
  const size_t q0 = jb * g->ncp, q1 = q0 + g->ncp < g->npanels ? q0 + g->ncp : g->npanels;
  const size_t ap0 = round_b * g->mpanels + p0, bq0 = round_b * g->npanels + q0;
  const size_t row0 = p0 * mr, row1 = p1 * mr < a->m ? p1 * mr : a->m;
  const size_t col0 = q0 * nr, cols = a->n - col0 < ldc ? a->n - col0 : ldc;
  int32_t ea[GEMM_MC_ROWS + DFP_TILE_MAX_ROWS]; /* the block's rows: GEMM_MC_ROWS rounded up to panels */
  for (size_t row = row0; row < row1; ++row) ea[row - row0] = a->ea[b * a->ea_batch_stride + row * a->ea_stride];
  const int16_t* apack = g->apack + ap0 * g->kpairs * mr * 2;
  const int16_t* bpack = g->bpack + bq0 * g->kpairs * nr * 2;
  uint64_t* abound = g->abound + ap0 * g->kblocks * DFP_CHUNK_LEVELS;
  uint64_t* bbound = g->bbound + bq0 * g->kblocks * DFP_CHUNK_LEVELS;
  if (g->kblocks == 1 && dfp_encodes_tiles(g->cfg, a->out.format, a->eb_stride)) {
    /* K <= 576: each tile encoded as it is computed, no int64 block */
    const dfp_block block = {
        .a = apack, .a_stride = g->kpairs * mr * 2, .mpanels = p1 - p0,
        .abound = abound, .abound_stride = DFP_CHUNK_LEVELS,
        .b = bpack, .b_stride = g->kpairs * nr * 2, .npanels = q1 - q0,
        .bbound = bbound, .bbound_stride = DFP_CHUNK_LEVELS, .kpairs = g->kpairs};
    const dfp_block_output out = {&a->out, (b * a->m + row0) * a->n + col0, a->n, row1 - row0, cols, ea,
                                  a->eb[b * a->eb_batch_stride], dfp_stream_output(a->batch * a->m * a->n * sizeof(float))};
    dfp_multiply_encode_block(g->cfg, &block, &out);
    return;
  }

  const size_t acc_bytes = g->mcp * mr * ldc * sizeof(int64_t);
  int64_t* acc = (int64_t*)dfp_scratch(DFP_SCRATCH_SUMS, acc_bytes);
  if (acc == NULL) {
    dfp_fail(&g->status, DFP_ERR_ALLOC);
    return;
  }
  if (g->kpairs == 0) memset(acc, 0, acc_bytes); /* else the first K block stores its sums */
  for (size_t pc = 0, kb = 0; pc < g->kpairs; pc += g->kc, ++kb) {
    const dfp_block block = {
        .a = apack + pc * mr * 2, .a_stride = g->kpairs * mr * 2, .mpanels = p1 - p0,
        .abound = abound + kb * DFP_CHUNK_LEVELS, .abound_stride = g->kblocks * DFP_CHUNK_LEVELS,
        .b = bpack + pc * nr * 2, .b_stride = g->kpairs * nr * 2, .npanels = q1 - q0,
        .bbound = bbound + kb * DFP_CHUNK_LEVELS, .bbound_stride = g->kblocks * DFP_CHUNK_LEVELS,
        .kpairs = g->kpairs - pc < g->kc ? g->kpairs - pc : g->kc};
    dfp_multiply_block(g->cfg, &block, acc, ldc, pc > 0);
  }
  for (size_t row = row0; row < row1; ++row)
    dfp_encode_row(g->cfg, &a->out, (b * a->m + row) * a->n + col0, acc + (row - row0) * ldc, cols,
                   ea[row - row0], a->eb + b * a->eb_batch_stride + col0 * a->eb_stride, a->eb_stride);
}

/* A single product with one exponent for b, whose packed operands would outweigh
 * GEMM_PACK_BYTES, as the 1x1 convolution it is (conv.c) where that convolution's macro-loops
 * serve it better: this loop packs both operands whole before it multiplies (buffers that glibc
 * maps afresh, and the OS zero-fills, on every call once they reach 32 MB) and leaves a short
 * output with a long reduction (a dense layer's weight gradient, K its tokens) to a task or
 * two. With a m-major, y = a b is the forward convolution of x = a [M][K] (M pixels of K
 * channels, an image each where ea has a row exponent each) and the weights b [K][N] (b n-major:
 * [N][K], the features-major view), which packs A per cache block, each once where N <=
 * CONV_NC_COLS; with a k-major and M < K, a^T b is the weight gradient of x = a [K][M] (K
 * pixels of M channels) and dy = b [K][N], which packs B in rounds and splits K over the
 * threads. The same exact sums, so the same bits. Returns 0, running nothing, for other
 * products. */
static int run_as_convolution(const dfp_gemm_args* a, dfp_isa isa, const dfp_parallel* par, int* status) {
  if (a->batch != 1 || a->eb_stride != 0 || (a->m + a->n) * a->k * sizeof(int16_t) < GEMM_PACK_BYTES) return 0;
  const int forward = !a->a_kmajor && a->n <= CONV_NC_COLS;
  const int weight_gradient = a->a_kmajor && !a->b_nmajor && a->ea_stride == 0 && a->m < a->k;
  if (!forward && !weight_gradient) return 0;
  dfp_conv_args c;
  memset(&c, 0, sizeof c);
  dfp_conv_shape* s = &c.shape;
  for (int d = 0; d < 3; ++d) {
    s->in[d] = s->out[d] = s->window[d] = 1;
    s->stride[d] = s->lhs_dil[d] = s->rhs_dil[d] = 1;
  }
  const size_t pixels = forward ? a->m : a->k;
  s->batch = a->ea_stride && pixels ? pixels : 1;
  s->in[0] = s->out[0] = pixels / s->batch;
  s->groups = 1;
  s->cin = forward ? a->k : a->m;
  s->cout = a->n;
  if (a->b_nmajor) {
    c.weights.mapped = c.weights.features_major = 1;
    for (int d = 0; d < 3; ++d) c.weights.window[d] = 1, c.weights.tap_step[d] = 1;
  }
  c.x = a->a;
  c.ex = a->ea;
  c.ex_batch_stride = a->ea_stride;
  c.b = a->b;
  c.eb = a->eb[0];
  c.out = a->out;
  *status = forward ? dfp_conv_forward(&c, isa, par) : dfp_conv_backward_weights(&c, isa, par);
  return 1;
}

int dfp_gemm(const dfp_gemm_args* args, dfp_isa isa, const dfp_parallel* par) {
  int delegated;
  if (run_as_convolution(args, isa, par, &delegated)) return delegated;
  gemm_plan g;
  memset(&g, 0, sizeof g);
  const int status = dfp_plan_init(isa, &par, &g.cfg, &g.mr, &g.nr);
  if (status != DFP_OK) return status;
  g.args = args;
  g.kpairs = (args->k + 1) / 2;
  g.kc = dfp_kc_pairs(g.kpairs);
  g.kblocks = dfp_kc_blocks(g.kpairs, g.kc);
  g.mpanels = (args->m + g.mr - 1) / g.mr;
  g.npanels = (args->n + g.nr - 1) / g.nr;
  g.mcp = (GEMM_MC_ROWS + g.mr - 1) / g.mr;
  g.ncp = (GEMM_NC_COLS + g.nr - 1) / g.nr;
  g.mblocks = (g.mpanels + g.mcp - 1) / g.mcp;
  g.nblocks = (g.npanels + g.ncp - 1) / g.ncp;
  if (dfp_check_output(&args->out, args->k) != DFP_OK) return DFP_ERR_BAD_SHAPE;
  if (args->batch == 0 || args->m == 0 || args->n == 0) return DFP_OK;

  dfp_advise_output(args->out.data, args->batch * args->m * args->n * dfp_out_element_bytes(args->out.format));
  /* The batch in rounds of elements whose packed operands take GEMM_PACK_BYTES (at least one
   * element): buffers glibc reuses and the cache holds, where packing the whole batch at once
   * would map them afresh (an attention's 64 products of 1024 x 1024 x 64: 134 MB of A). */
  const size_t kp = g.kpairs ? g.kpairs : 1, levels = (g.kblocks ? g.kblocks : 1) * DFP_CHUNK_LEVELS;
  const size_t element = (g.mpanels * g.mr + g.npanels * g.nr) * kp * 2 * sizeof(int16_t);
  size_t round = GEMM_PACK_BYTES / element;
  round = round < 1 ? 1 : round > args->batch ? args->batch : round;
  const size_t apanels = round * g.mpanels, bpanels = round * g.npanels;
  g.apack = (int16_t*)malloc(apanels * kp * g.mr * 2 * sizeof(int16_t));
  g.bpack = (int16_t*)malloc(bpanels * kp * g.nr * 2 * sizeof(int16_t));
  g.abound = (uint64_t*)malloc(apanels * levels * sizeof(uint64_t));
  g.bbound = (uint64_t*)malloc(bpanels * levels * sizeof(uint64_t));
  if (!g.apack || !g.bpack || !g.abound || !g.bbound) {
    g.status = DFP_ERR_ALLOC;
  } else {
    for (; g.batch0 < args->batch && g.status == DFP_OK; g.batch0 += round) {
      const size_t elements = round < args->batch - g.batch0 ? round : args->batch - g.batch0;
      par->parallel_for(par->pool, elements * pack_groups(g.mpanels), pack_a_task, &g);
      par->parallel_for(par->pool, elements * pack_groups(g.npanels), pack_b_task, &g);
      if (g.status == DFP_OK)
        par->parallel_for(par->pool, elements * g.mblocks * g.nblocks, block_task, &g);
    }
  }
  free(g.apack);
  free(g.bpack);
  free(g.abound);
  free(g.bbound);
  return g.status;
}
