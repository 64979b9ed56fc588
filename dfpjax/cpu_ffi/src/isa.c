/* The per-ISA configurations (isa_config.h) and run-time ISA selection: CPUID feature bits
 * plus the OS's saved-register support. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "channel_sums.h"
#include "dfp_kernel.h"
#include "isa_config.h"
#include "macro.h"
#include "pack.h"
#include "quantize.h"

static const dfp_isa_config kConfigs[DFP_ISA_COUNT] = {
    [DFP_ISA_PORTABLE] = {&dfp_ukernel_portable, dfp_pack_rows_portable, dfp_pack_columns_portable,
                          dfp_interleave_pairs_portable, dfp_norm_bounds_portable, dfp_fine_bounds_portable,
                          dfp_encode_f32_portable, dfp_max_magnitude_portable, dfp_quantize_row_portable,
                          dfp_add_runs_portable, NULL, dfp_split_sums_portable, dfp_channel_sums_rows_portable},
#if defined(DFPJAX_X86)
#if defined(DFPJAX_EMULATE_VNNI)
/* Verification builds run the AVX-512 path on AVX2 hardware: its row and column copies, output
 * stage and run adds stay AVX2; its quantization rows are emulated (vnni_emulation.h). */
#define AVX512_ROWS dfp_encode_f32_avx2, dfp_max_magnitude_avx512, dfp_quantize_row_avx512
#define AVX512_ADD_RUNS dfp_add_runs_avx2
#define AVX512_PACK_COLUMNS dfp_pack_columns_avx2
#define AVX512_PACK_ROWS dfp_pack_rows_avx2
#define AVX512_BOUNDS dfp_norm_bounds_avx2, dfp_fine_bounds_avx2
#else
#define AVX512_ROWS dfp_encode_f32_avx512, dfp_max_magnitude_avx512, dfp_quantize_row_avx512
#define AVX512_ADD_RUNS dfp_add_runs_avx512
#define AVX512_PACK_COLUMNS dfp_pack_columns_avx512
#define AVX512_PACK_ROWS dfp_pack_rows_avx512
#define AVX512_BOUNDS dfp_norm_bounds_avx512, dfp_fine_bounds_avx2
#endif
#define AVX2_BOUNDS dfp_norm_bounds_avx2, dfp_fine_bounds_avx2
#define AVX2_PACKING dfp_pack_rows_avx2, dfp_pack_columns_avx2, dfp_interleave_pairs_avx2, AVX2_BOUNDS
#define AVX2_ROWS dfp_encode_f32_avx2, dfp_max_magnitude_avx2, dfp_quantize_row_avx2
    [DFP_ISA_AVX2] = {&dfp_ukernel_avx2, AVX2_PACKING, AVX2_ROWS, dfp_add_runs_avx2, dfp_add_runs_s32_avx2,
                      dfp_split_sums_avx2, dfp_channel_sums_rows_avx2, dfp_stream_rows_avx2},
    [DFP_ISA_AVX_VNNI] = {&dfp_ukernel_avx_vnni, AVX2_PACKING, AVX2_ROWS, dfp_add_runs_avx2, dfp_add_runs_s32_avx2,
                          dfp_split_sums_avx2, dfp_channel_sums_rows_avx2, dfp_stream_rows_avx2},
    [DFP_ISA_AVX512_VNNI] = {&dfp_ukernel_avx512_vnni, AVX512_PACK_ROWS, AVX512_PACK_COLUMNS,
                             dfp_interleave_pairs_avx2, AVX512_BOUNDS, AVX512_ROWS, AVX512_ADD_RUNS,
                             dfp_add_runs_s32_avx2, dfp_split_sums_avx2, dfp_channel_sums_rows_avx2},
#undef AVX2_ROWS
#undef AVX2_PACKING
#undef AVX2_BOUNDS
#undef AVX512_ROWS
#undef AVX512_ADD_RUNS
#undef AVX512_PACK_COLUMNS
#undef AVX512_PACK_ROWS
#undef AVX512_BOUNDS
#endif
};

const dfp_isa_config* dfp_isa_config_for(dfp_isa isa) {
  if ((int)isa < 0 || isa >= DFP_ISA_COUNT || kConfigs[isa].ukernel == NULL) return NULL;
  return &kConfigs[isa];
}

int dfp_isa_tile(dfp_isa isa, int* mr, int* nr) {
  const dfp_isa_config* cfg = dfp_isa_config_for(isa);
  if (cfg == NULL) return -1;
  *mr = cfg->ukernel->mr;
  *nr = cfg->ukernel->nr;
  return 0;
}

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static unsigned long long xgetbv0(void) {
  unsigned int lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((unsigned long long)hi << 32) | lo;
}

static int detect(dfp_isa isa) {
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int osxsave = (c >> 27) & 1;
  if (!osxsave) return 0;
  const unsigned long long xcr0 = xgetbv0();
  const int ymm_os = (xcr0 & 0x6) == 0x6;
  const int zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, 0) < 7) return 0;
  unsigned int b7, c7, d7, a7;
  __cpuid_count(7, 0, a7, b7, c7, d7);
  unsigned int a71, b71, c71, d71;
  __cpuid_count(7, 1, a71, b71, c71, d71);
  const int avx2 = ymm_os && ((b7 >> 5) & 1);
  switch (isa) {
    case DFP_ISA_AVX2:
      return avx2;
    case DFP_ISA_AVX_VNNI:
      return avx2 && ((a71 >> 4) & 1);
    case DFP_ISA_AVX512_VNNI:
      return zmm_os && ((b7 >> 16) & 1) /* F */ && ((b7 >> 30) & 1) /* BW */ &&
             ((c7 >> 11) & 1) /* VNNI */;
    default:
      return 0;
  }
}
#else
static int detect(dfp_isa isa) { (void)isa; return 0; }
#endif

int dfp_isa_emulated(dfp_isa isa) {
#if defined(DFPJAX_EMULATE_VNNI)
  return isa == DFP_ISA_AVX_VNNI || isa == DFP_ISA_AVX512_VNNI;
#else
  (void)isa;
  return 0;
#endif
}

/* Bit isa set where the CPU and OS run that ISA's instructions. Detected once: every kernel
 * call asks, and in a virtual machine each CPUID traps to the hypervisor (microseconds, ten
 * per call). Threads racing on the first call store the same mask. */
static int detected_mask(void) {
  static atomic_int mask = -1;
  int m = atomic_load_explicit(&mask, memory_order_relaxed);
  if (m < 0) {
    m = 0;
    for (int isa = 0; isa < DFP_ISA_COUNT; ++isa) m |= detect((dfp_isa)isa) << isa;
    atomic_store_explicit(&mask, m, memory_order_relaxed);
  }
  return m;
}

int dfp_isa_supported(dfp_isa isa) {
  if (isa == DFP_ISA_PORTABLE) return 1;
  if (dfp_isa_config_for(isa) == NULL) return 0;
  /* An emulated microkernel is AVX2 code (vnni_emulation.h). */
  return (detected_mask() >> (dfp_isa_emulated(isa) ? DFP_ISA_AVX2 : isa)) & 1;
}

static const char* const kNames[DFP_ISA_COUNT] = {"portable", "avx2", "avx_vnni", "avx512_vnni"};

const char* dfp_isa_name(dfp_isa isa) {
  return ((int)isa >= 0 && isa < DFP_ISA_COUNT) ? kNames[isa] : "unknown";
}

dfp_isa dfp_best_isa(void) {
  for (int isa = DFP_ISA_COUNT - 1; isa > 0; --isa)
    if (dfp_isa_supported((dfp_isa)isa) && !dfp_isa_emulated((dfp_isa)isa)) return (dfp_isa)isa;
  return DFP_ISA_PORTABLE;
}

int dfp_selected_isa(void) {
  const char* forced = getenv("DFPJAX_ISA");
  if (forced == NULL || forced[0] == '\0') return dfp_best_isa();
  for (int isa = 0; isa < DFP_ISA_COUNT; ++isa)
    if (strcmp(forced, kNames[isa]) == 0) return isa;
  return -1;
}
