/* Macro-loop of the exact DFP GEMM: pack, choose provably safe int32 chunks, run the
 * microkernel over cache blocks in parallel, encode the exact sums (spec section 3). */
#include <stdlib.h>
#include <string.h>

#include "dfp_kernel.h"
#include "encode.h"
#include "pack.h"
#include "ukernel.h"

enum {
  KC_PAIRS = 256,     /* K block (pairs): a B micro-panel of KC_PAIRS x NR stays in L1 */
  MC_ROWS = 64,       /* rows of a cache block, rounded up to whole micro-panels */
  NC_COLS = 128,      /* columns of a cache block */
  NONFINITE = 0x7fffffff,
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

/* Longest chunk (in pairs) over which every partial sum of an A-panel row with a B-panel
 * column provably fits int32, for the K block of `nblk` norm blocks. By Cauchy-Schwarz,
 * |sum_k a_k b_k| <= ||a|| ||b||, and a row's squared norm over a chunk is at most the sum
 * of the panel's per-block maxima. Returns 1 (always safe: one pair is at most
 * 2 * 32767^2 < 2^31) when even a single block cannot be proven safe. */
static size_t safe_chunk(const int64_t* anorm, const int64_t* bnorm, size_t nblk) {
  const unsigned __int128 limit = (unsigned __int128)INT32_MAX * INT32_MAX;
  uint64_t sa[KC_PAIRS / DFP_NORM_BLOCK_PAIRS], sb[KC_PAIRS / DFP_NORM_BLOCK_PAIRS];
  for (size_t i = 0; i < nblk; ++i) {
    sa[i] = (uint64_t)anorm[i];
    sb[i] = (uint64_t)bnorm[i];
    if ((unsigned __int128)sa[i] * sb[i] > limit) return 1;
  }
  size_t chunk = DFP_NORM_BLOCK_PAIRS;
  for (size_t count = nblk; count > 1; count = (count + 1) / 2) {
    for (size_t i = 0; i < count / 2; ++i) {
      const uint64_t a = sa[2 * i] + sa[2 * i + 1], b = sb[2 * i] + sb[2 * i + 1];
      if ((unsigned __int128)a * b > limit) return chunk;
    }
    for (size_t i = 0; i < count / 2; ++i) {
      sa[i] = sa[2 * i] + sa[2 * i + 1];
      sb[i] = sb[2 * i] + sb[2 * i + 1];
    }
    if (count & 1) {
      sa[count / 2] = sa[count - 1];
      sb[count / 2] = sb[count - 1];
    }
    chunk *= 2;
  }
  return (size_t)-1; /* the whole block */
}

typedef struct {
  const dfp_gemm_args* args;
  const dfp_ukernel* uk;
  size_t kpairs, nblk_total;
  size_t mpanels, npanels;         /* per batch element */
  size_t mblocks, nblocks;         /* cache blocks per batch element */
  int16_t* apack;                  /* [batch][mpanels][kpairs][MR][2] */
  int16_t* bpack;                  /* [batch][npanels][kpairs][NR][2] */
  int64_t* anorm;                  /* [batch][mpanels][nblk_total] */
  int64_t* bnorm;
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
                     g->apack + t * g->kpairs * mr * 2, g->anorm + t * g->nblk_total))
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
                     g->bpack + t * g->kpairs * nr * 2, g->bnorm + t * g->nblk_total))
    fail(g, DFP_ERR_BAD_MANTISSA);
}

static void store_f32(const dfp_gemm_args* a, size_t b, size_t row, size_t col, int64_t s) {
  const int32_t ea = a->ea[b * a->ea_batch_stride + row * a->ea_stride];
  const int32_t eb = a->eb[b * a->eb_batch_stride + col * a->eb_stride];
  uint32_t bits;
  if (ea == NONFINITE || eb == NONFINITE) {
    bits = 0x7fc00000u;
  } else {
    /* Fast path: the hardware int64 -> f32 conversion rounds once to nearest even, and
     * adding k to a normal result's exponent field is exact scaling. */
    const int32_t k = ea + eb;
    const float f = (float)s;
    memcpy(&bits, &f, sizeof bits);
    const int32_t e = (int32_t)((bits >> 23) & 0xff) + k;
    if (s != 0 && e >= 1 && e <= 254) bits += (uint32_t)k << 23;
    else bits = dfp_encode_scaled(s, k, &kDfpF32);
  }
  ((uint32_t*)a->out)[(b * a->m + row) * a->n + col] = bits;
}

static void store_half(const dfp_gemm_args* a, size_t b, size_t row, size_t col, int64_t s) {
  const int32_t ea = a->ea[b * a->ea_batch_stride + row * a->ea_stride];
  const int32_t eb = a->eb[b * a->eb_batch_stride + col * a->eb_stride];
  const int bf16 = a->out_format == DFP_OUT_BF16;
  uint16_t bits;
  if (ea == NONFINITE || eb == NONFINITE) bits = bf16 ? 0x7fc0 : 0x7e00;
  else bits = (uint16_t)dfp_encode_scaled(s, ea + eb, bf16 ? &kDfpBF16 : &kDfpF16);
  ((uint16_t*)a->out)[(b * a->m + row) * a->n + col] = bits;
}

/* One cache block: rows [i0, i0 + MC) x cols [j0, j0 + NC) of batch element b. */
static void block_task(void* arg, size_t t) {
  gemm_plan* g = (gemm_plan*)arg;
  const dfp_gemm_args* a = g->args;
  const int mr = g->uk->mr, nr = g->uk->nr, tile = mr * nr;
  const size_t mcp = (MC_ROWS + mr - 1) / mr, ncp = (NC_COLS + nr - 1) / nr;
  const size_t per_batch = g->mblocks * g->nblocks;
  const size_t b = t / per_batch, ib = (t % per_batch) / g->nblocks, jb = t % g->nblocks;
  const size_t p0 = ib * mcp, p1 = p0 + mcp < g->mpanels ? p0 + mcp : g->mpanels;
  const size_t q0 = jb * ncp, q1 = q0 + ncp < g->npanels ? q0 + ncp : g->npanels;

  int64_t* acc = (int64_t*)aligned_alloc(64, ((mcp * ncp * tile * sizeof(int64_t)) + 63) / 64 * 64);
  if (acc == NULL) {
    fail(g, DFP_ERR_ALLOC);
    return;
  }
  memset(acc, 0, mcp * ncp * tile * sizeof(int64_t));
  for (size_t pc = 0; pc < g->kpairs; pc += KC_PAIRS) {
    const size_t kc = g->kpairs - pc < KC_PAIRS ? g->kpairs - pc : KC_PAIRS;
    const size_t blk0 = pc / DFP_NORM_BLOCK_PAIRS, nblk = dfp_norm_blocks(kc);
    for (size_t q = q0; q < q1; ++q) {
      const size_t bq = b * g->npanels + q;
      const int16_t* bp = g->bpack + (bq * g->kpairs + pc) * nr * 2;
      const int64_t* bn = g->bnorm + bq * g->nblk_total + blk0;
      for (size_t p = p0; p < p1; ++p) {
        const size_t ap = b * g->mpanels + p;
        const size_t chunk = safe_chunk(g->anorm + ap * g->nblk_total + blk0, bn, nblk);
        g->uk->fn(kc, chunk < kc ? chunk : kc, g->apack + (ap * g->kpairs + pc) * mr * 2, bp,
                  acc + ((p - p0) * ncp + (q - q0)) * tile);
      }
    }
  }
  for (size_t p = p0; p < p1; ++p)
    for (size_t q = q0; q < q1; ++q) {
      const int64_t* c = acc + ((p - p0) * ncp + (q - q0)) * tile;
      for (int i = 0; i < mr && p * mr + i < a->m; ++i)
        for (int j = 0; j < nr && q * nr + j < a->n; ++j) {
          if (a->out_format == DFP_OUT_F32) store_f32(a, b, p * mr + i, q * nr + j, c[i * nr + j]);
          else store_half(a, b, p * mr + i, q * nr + j, c[i * nr + j]);
        }
    }
  free(acc);
}

static void serial_for(void* pool, size_t n, dfp_task_fn task, void* arg) {
  (void)pool;
  for (size_t i = 0; i < n; ++i) task(arg, i);
}

int dfp_gemm(const dfp_gemm_args* args, dfp_isa isa, const dfp_parallel* par) {
  if (!dfp_isa_supported(isa)) return DFP_ERR_ISA_UNSUPPORTED;
  const dfp_parallel serial = {serial_for, NULL, 1};
  if (par == NULL) par = &serial;
  gemm_plan g;
  memset(&g, 0, sizeof g);
  g.args = args;
  g.uk = dfp_ukernel_for(isa);
  const int mr = g.uk->mr, nr = g.uk->nr;
  g.kpairs = (args->k + 1) / 2;
  g.nblk_total = dfp_norm_blocks(g.kpairs);
  g.mpanels = (args->m + mr - 1) / mr;
  g.npanels = (args->n + nr - 1) / nr;
  g.mblocks = (g.mpanels + (MC_ROWS + mr - 1) / mr - 1) / ((MC_ROWS + mr - 1) / mr);
  g.nblocks = (g.npanels + (NC_COLS + nr - 1) / nr - 1) / ((NC_COLS + nr - 1) / nr);
  if (args->batch == 0 || args->m == 0 || args->n == 0) return DFP_OK;

  const size_t apanels = args->batch * g.mpanels, bpanels = args->batch * g.npanels;
  const size_t kp = g.kpairs ? g.kpairs : 1, nb = g.nblk_total ? g.nblk_total : 1;
  g.apack = (int16_t*)malloc(apanels * kp * mr * 2 * sizeof(int16_t));
  g.bpack = (int16_t*)malloc(bpanels * kp * nr * 2 * sizeof(int16_t));
  g.anorm = (int64_t*)malloc(apanels * nb * sizeof(int64_t));
  g.bnorm = (int64_t*)malloc(bpanels * nb * sizeof(int64_t));
  if (!g.apack || !g.bpack || !g.anorm || !g.bnorm) {
    g.status = DFP_ERR_ALLOC;
  } else {
    par->parallel_for(par->pool, apanels, pack_a_task, &g);
    par->parallel_for(par->pool, bpanels, pack_b_task, &g);
    if (g.status == DFP_OK)
      par->parallel_for(par->pool, args->batch * g.mblocks * g.nblocks, block_task, &g);
  }
  free(g.apack);
  free(g.bpack);
  free(g.anorm);
  free(g.bnorm);
  return g.status;
}
