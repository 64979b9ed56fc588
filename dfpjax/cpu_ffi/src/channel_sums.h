/* Per-channel sums of float32 rows in double (channel_sums.c). The portable rows in
 * channel_sums.c are the specification; channel_sums_avx2.c's compute the same bits (they are
 * the AVX-512 path's too: AVX-512 rows of 16 channels a step measured slower on a Zen 4): each
 * channel's terms are added in row order, one IEEE double addition each, and every product is
 * of two float32 values, exact in double (so an FMA rounds it as a multiply and an add do).
 * Each path's rows are an entry of its configuration (isa_config.h). */
#ifndef DFPJAX_CHANNEL_SUMS_H_
#define DFPJAX_CHANNEL_SUMS_H_

#include <stddef.h>

/* For rows r < rows of a and b (stride floats apart) and each channel c < channels:
 * sum[c] += a[r][c] and dot[c] += a[r][c] * (b[r][c] - center[c]), row after row, the
 * difference rounded to float32 (as float32 arithmetic would). */
void dfp_channel_sums_rows_portable(const float* a, const float* b, const float* center, size_t rows,
                                    size_t channels, size_t stride, double* sum, double* dot);
void dfp_channel_sums_rows_avx2(const float* a, const float* b, const float* center, size_t rows,
                                size_t channels, size_t stride, double* sum, double* dot);

#endif
