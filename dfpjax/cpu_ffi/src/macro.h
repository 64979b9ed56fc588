/* Pieces shared by the macro-loops of the GEMM (gemm.c) and the convolutions (conv.c):
 * the exact int32 chunk length for a pair of packed panels, the output stage, and the
 * serial fallback for a missing thread pool. */
#ifndef DFPJAX_MACRO_H_
#define DFPJAX_MACRO_H_

#include <stddef.h>
#include <stdint.h>

#include "dfp_kernel.h"

/* The largest partial sum a chunk may reach (ukernel.h): int32 less a carried remainder. */
#define DFP_CHUNK_SUM_MAX (INT32_MAX - 0xffff)

/* Longest chunk (in pairs) over which every partial sum of an A-panel row with a B-panel
 * column provably stays within +-DFP_CHUNK_SUM_MAX, from the panels' bounds for one K block
 * (pack.h). */
size_t dfp_safe_chunk(const uint64_t* abound, const uint64_t* bbound);

/* out[out_index + j] = fl(s[j]) * 2**(ea + eb[j * eb_stride]) for j < n, in the output
 * format; NaN where an exponent marks a non-finite operand (spec sections 2 and 3). avx2
 * selects the AVX2 float32 stage (dfp_ukernel.avx2). */
void dfp_encode_row(dfp_out_format format, void* out, size_t out_index, const int64_t* s, size_t n,
                    int32_t ea, const int32_t* eb, size_t eb_stride, int avx2);

/* parallel_for over the calling thread alone. */
extern const dfp_parallel dfp_serial;

#endif
