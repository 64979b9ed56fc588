/* Macro-loop of the exact DFP GEMM: pack, choose provably safe int32 chunks, run the
 * microkernel over cache blocks in parallel, encode the exact sums (spec section 3). */
#include <stdlib.h>
#include <string.h>

#include "dfp_kernel.h"
#include "macro.h"
#include "pack.h"
#include "ukernel.h"

enum {
  MC_ROWS = 64,       /* rows of a cache block, rounded up to whole micro-panels */
  NC_COLS = 128,      /* columns of a cache block */
};

const dfp_ukernel* dfp_ukernel_for(dfp_isa isa) {
  switch (isa) {
    case DFP_ISA_PORTABLE: return &dfp_ukernel_portable;
#if defined(DFPJAX_X86)
    case DFP_ISA_AVX2: return &dfp_ukernel_avx2;
    case DFP_ISA_AVX_VNNI: return &dfp_ukernel_avx_vnni;
    case DFP_ISA_AVX512_VNNI: return &dfp_ukernel_avx512_vnni;
#endif
    default: return NULL;
  }
}

typedef struct {
  const dfp_gemm_args* args;
  const dfp_ukernel* uk;
  size_t kpairs, kblocks;
  size_t mpanels, npanels;         /* per batch element */
  size_t mblocks, nblocks;         /* cache blocks per batch element */
  int16_t* apack;                  /* [batch][mpanels][kpairs][MR][2] */
  int16_t* bpack;                  /* [batch][npanels][kpairs][NR][2] */
  uint64_t* abound;                /* [batch][mpanels][kblocks][DFP_CHUNK_LEVELS] */
  uint64_t* bbound;
  int status;                      /* first error seen by any task, DFP_OK if none */
} gemm_plan;

static void fail(gemm_plan* g, int status) { __atomic_store_n(&g->status, status, __ATOMIC_RELAXED); }

static void pack_a_task(void* arg, size_t t) {
  gemm_plan* g = (gemm_plan*)arg;
  const dfp_gemm_args* a = g->args;
  const size_t b = t / g->mpanels, panel = t % g->mpanels;
  const int mr = g->uk->mr;
  const int16_t* src = a->a + b * a->m * a->k;
  const size_t rs = a->a_kmajor ? 1 : a->k, cs = a->a_kmajor ? a->m : 1;
  if (dfp_pack_panel(src, a->m, a->k, rs, cs, panel * mr, mr,
                     g->apack + t * g->kpairs * mr * 2, g->abound + t * g->kblocks * DFP_CHUNK_LEVELS, g->uk->avx2))
    fail(g, DFP_ERR_BAD_MANTISSA);
}

static void pack_b_task(void* arg, size_t t) {
  gemm_plan* g = (gemm_plan*)arg;
  const dfp_gemm_args* a = g->args;
  const size_t b = t / g->npanels, panel = t % g->npanels;
  const int nr = g->uk->nr;
  const int16_t* src = a->b + b * a->n * a->k;
  const size_t rs = a->b_nmajor ? a->k : 1, cs = a->b_nmajor ? 1 : a->n;
  if (dfp_pack_panel(src, a->n, a->k, rs, cs, panel * nr, nr,
                     g->bpack + t * g->kpairs * nr * 2, g->bbound + t * g->kblocks * DFP_CHUNK_LEVELS, g->uk->avx2))
    fail(g, DFP_ERR_BAD_MANTISSA);
}

/* One cache block: rows [i0, i0 + MC) x cols [j0, j0 + NC) of batch element b. */
static void block_task(void* arg, size_t t) {
  gemm_plan* g = (gemm_plan*)arg;
  const dfp_gemm_args* a = g->args;
  const int mr = g->uk->mr, nr = g->uk->nr;
  const size_t mcp = (MC_ROWS + mr - 1) / mr, ncp = (NC_COLS + nr - 1) / nr;
  const size_t ldc = ncp * nr; /* the block accumulator is row-major [mcp * mr][ldc] */
  const size_t per_batch = g->mblocks * g->nblocks;
  const size_t b = t / per_batch, ib = (t % per_batch) / g->nblocks, jb = t % g->nblocks;
  const size_t p0 = ib * mcp, p1 = p0 + mcp < g->mpanels ? p0 + mcp : g->mpanels;
  const size_t q0 = jb * ncp, q1 = q0 + ncp < g->npanels ? q0 + ncp : g->npanels;

  const size_t acc_bytes = mcp * mr * ldc * sizeof(int64_t);
  int64_t* acc = (int64_t*)aligned_alloc(64, (acc_bytes + 63) / 64 * 64);
  if (acc == NULL) {
    fail(g, DFP_ERR_ALLOC);
    return;
  }
  if (g->kpairs == 0) memset(acc, 0, acc_bytes); /* else the first K block stores its sums */
  for (size_t pc = 0; pc < g->kpairs; pc += DFP_KC_PAIRS) {
    const size_t kc = g->kpairs - pc < DFP_KC_PAIRS ? g->kpairs - pc : DFP_KC_PAIRS;
    const size_t level_offset = (pc / DFP_KC_PAIRS) * DFP_CHUNK_LEVELS;
    for (size_t q = q0; q < q1; ++q) {
      const size_t bq = b * g->npanels + q;
      const int16_t* bp = g->bpack + (bq * g->kpairs + pc) * nr * 2;
      const uint64_t* bb = g->bbound + bq * g->kblocks * DFP_CHUNK_LEVELS + level_offset;
      for (size_t p = p0; p < p1; ++p) {
        const size_t ap = b * g->mpanels + p;
        const size_t chunk = dfp_safe_chunk(g->abound + ap * g->kblocks * DFP_CHUNK_LEVELS + level_offset, bb);
        g->uk->fn(kc, chunk < kc ? chunk : kc, g->apack + (ap * g->kpairs + pc) * mr * 2, bp,
                  acc + (p - p0) * mr * ldc + (q - q0) * nr, ldc, pc > 0);
      }
    }
  }
  const size_t col0 = q0 * nr, cols = a->n - col0 < ldc ? a->n - col0 : ldc;
  for (size_t row = p0 * mr; row < p1 * mr && row < a->m; ++row)
    dfp_encode_row(a->out_format, a->out, (b * a->m + row) * a->n + col0,
                   acc + (row - p0 * mr) * ldc, cols,
                   a->ea[b * a->ea_batch_stride + row * a->ea_stride],
                   a->eb + b * a->eb_batch_stride + col0 * a->eb_stride, a->eb_stride, g->uk->avx2);
  free(acc);
}

int dfp_gemm(const dfp_gemm_args* args, dfp_isa isa, const dfp_parallel* par) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  if (par == NULL) par = &dfp_serial;
  gemm_plan g;
  memset(&g, 0, sizeof g);
  g.args = args;
  g.uk = dfp_ukernel_for(isa);
  const int mr = g.uk->mr, nr = g.uk->nr;
  g.kpairs = (args->k + 1) / 2;
  g.kblocks = dfp_kc_blocks(g.kpairs);
  g.mpanels = (args->m + mr - 1) / mr;
  g.npanels = (args->n + nr - 1) / nr;
  g.mblocks = (g.mpanels + (MC_ROWS + mr - 1) / mr - 1) / ((MC_ROWS + mr - 1) / mr);
  g.nblocks = (g.npanels + (NC_COLS + nr - 1) / nr - 1) / ((NC_COLS + nr - 1) / nr);
  if (args->batch == 0 || args->m == 0 || args->n == 0) return DFP_OK;

  const size_t apanels = args->batch * g.mpanels, bpanels = args->batch * g.npanels;
  const size_t kp = g.kpairs ? g.kpairs : 1, levels = (g.kblocks ? g.kblocks : 1) * DFP_CHUNK_LEVELS;
  g.apack = (int16_t*)malloc(apanels * kp * mr * 2 * sizeof(int16_t));
  g.bpack = (int16_t*)malloc(bpanels * kp * nr * 2 * sizeof(int16_t));
  g.abound = (uint64_t*)malloc(apanels * levels * sizeof(uint64_t));
  g.bbound = (uint64_t*)malloc(bpanels * levels * sizeof(uint64_t));
  if (!g.apack || !g.bpack || !g.abound || !g.bbound) {
    g.status = DFP_ERR_ALLOC;
  } else {
    par->parallel_for(par->pool, apanels, pack_a_task, &g);
    par->parallel_for(par->pool, bpanels, pack_b_task, &g);
    if (g.status == DFP_OK)
      par->parallel_for(par->pool, args->batch * g.mblocks * g.nblocks, block_task, &g);
  }
  free(g.apack);
  free(g.bpack);
  free(g.abound);
  free(g.bbound);
  return g.status;
}
