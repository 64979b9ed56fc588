/* channel_sums.h's rows in AVX2, row by row (the operands read in order: measured faster from
 * memory than sums kept in registers over a few rows at a time), 8 channels a step and the
 * rest of a row one by one (masked stores are slow on AMD's cores). */
#include <immintrin.h>

#include "channel_sums.h"

/* The rows; with squares (a is b and the center zero, so b - center is a, bit for bit) each
 * element is converted once. Inlined with squares a constant: two loops, each without the
 * other's work. */
static inline void rows_of(const float* a, const float* b, const float* center, size_t rows,
                           size_t channels, size_t stride, double* sum, double* dot, const int squares) {
  const size_t vectors = channels / 8 * 8;
  for (size_t r = 0; r < rows; ++r, a += stride, b += stride) {
    for (size_t c = 0; c < vectors; c += 8) {
      const __m256 av = _mm256_loadu_ps(a + c);
      const __m256d a0 = _mm256_cvtps_pd(_mm256_castps256_ps128(av));
      const __m256d a1 = _mm256_cvtps_pd(_mm256_extractf128_ps(av, 1));
      __m256d c0 = a0, c1 = a1;
      if (!squares) {
        const __m256 cv = _mm256_sub_ps(_mm256_loadu_ps(b + c), _mm256_loadu_ps(center + c));
        c0 = _mm256_cvtps_pd(_mm256_castps256_ps128(cv));
        c1 = _mm256_cvtps_pd(_mm256_extractf128_ps(cv, 1));
      }
      _mm256_storeu_pd(sum + c, _mm256_add_pd(_mm256_loadu_pd(sum + c), a0));
      _mm256_storeu_pd(sum + c + 4, _mm256_add_pd(_mm256_loadu_pd(sum + c + 4), a1));
      /* The products are exact. */
      _mm256_storeu_pd(dot + c, _mm256_add_pd(_mm256_loadu_pd(dot + c), _mm256_mul_pd(a0, c0)));
      _mm256_storeu_pd(dot + c + 4, _mm256_add_pd(_mm256_loadu_pd(dot + c + 4), _mm256_mul_pd(a1, c1)));
    }
    for (size_t c = vectors; c < channels; ++c) {
      const float centered = b[c] - center[c];
      sum[c] += (double)a[c];
      dot[c] += (double)a[c] * (double)centered;
    }
  }
}

void dfp_channel_sums_rows_avx2(const float* a, const float* b, const float* center, size_t rows,
                                size_t channels, size_t stride, double* sum, double* dot) {
  int zero_center = 1;
  for (size_t c = 0; c < channels; ++c) zero_center &= center[c] == 0.0f;
  if (a == b && zero_center)
    rows_of(a, b, center, rows, channels, stride, sum, dot, 1);
  else
    rows_of(a, b, center, rows, channels, stride, sum, dot, 0);
}
