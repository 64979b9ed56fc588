/* Portable microkernel: products accumulate straight into int64, exact for any chunk. */
#include "ukernel.h"

enum { MR = 4, NR = 4 };
DFP_CHECK_TILE(MR, NR);

static void ukernel(size_t kpairs, size_t chunk, const int16_t* a, const int16_t* b, int64_t* acc,
                    size_t ldc, int add) {
  (void)chunk;
  int64_t c[MR][NR] = {{0}};
  for (size_t p = 0; p < kpairs; ++p, a += 2 * MR, b += 2 * NR)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        c[i][j] += (int32_t)a[2 * i] * b[2 * j] + (int32_t)a[2 * i + 1] * b[2 * j + 1];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * ldc + j] = (add ? acc[i * ldc + j] : 0) + c[i][j];
}

const dfp_ukernel dfp_ukernel_portable = {MR, NR, ukernel, NULL, NULL, NULL};
