/* Float -> DFP quantization rows (spec section 2, round half to even), integer-only so
 * that flush-to-zero modes and the rounding mode cannot change them. The portable rows
 * in quantize.c are the specification; quantize_avx2.c and quantize_avx512.c compute the
 * same bits. Each path's pair of them is an entry of its configuration (isa_config.h). */
#ifndef DFPJAX_QUANTIZE_H_
#define DFPJAX_QUANTIZE_H_

#include <stddef.h>
#include <stdint.h>

/* How far ahead of their loads, in floats, the SIMD rows prefetch their floats: without it the
 * fused loop gained 10% over separate passes, with 2 KB ahead 15-20% (Zen 3, 2 threads,
 * 103 MB; on Zen 4, 2 threads, 1, 4 or 8 KB 2-8% slower, none 12%); and, into L2, DFP_QUANTIZE_L2_AHEAD
 * (8 KB: a 103 MB tensor's quantization 5-10% shorter on Zen 4, 2 threads; 4 KB less, 16 and
 * 32 KB no more). The addresses as integers: a prefetch past the row is harmless, it never
 * faults. */
enum { DFP_QUANTIZE_AHEAD = 512, DFP_QUANTIZE_L2_AHEAD = 2048 };

/* The largest magnitude bit pattern (sign cleared) of x[0, n). */
uint32_t dfp_max_magnitude_portable(const float* x, size_t n);
uint32_t dfp_max_magnitude_avx2(const float* x, size_t n);
uint32_t dfp_max_magnitude_avx512(const float* x, size_t n);

/* m[i] = saturate(R(x[i] * 2**-e)) with |m| <= limit (spec section 2) where |x[i]| * 2**-e
 * < 2**15, as for every finite x[i] when e is the exponent of a largest magnitude at least
 * x's; returns dfp_max_magnitude of x[0, n), taken from the same loads. The one-pass
 * quantization (quantize.c) gives a row the exponent of the maxima seen before it: where an
 * x[i] lies past that range, or is not finite, m[i] is some value (no undefined behaviour) that
 * the caller then overwrites. stream: m belongs to an output of DFP_STREAM_OUTPUT_BYTES or more
 * (macro.h); the AVX2 and AVX-512 rows then store non-temporally where m is 32-byte aligned, and
 * fence before they return. */
uint32_t dfp_quantize_row_portable(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream);
uint32_t dfp_quantize_row_avx2(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream);
uint32_t dfp_quantize_row_avx512(const float* x, size_t n, int32_t e, int32_t limit, int16_t* m, int stream);

#endif
