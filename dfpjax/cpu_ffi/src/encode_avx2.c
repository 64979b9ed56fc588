/* AVX2 output stage: fl(s) * 2**k for four int64 sums at a time (the scalar stage in
 * encode.h is the specification; lanes this fast path cannot prove exact fall back to it). */
#include <immintrin.h>
#include <string.h>

#include "encode.h"
#include "macro.h"

/* Exponents within +-2**29 add in int32 lanes without wrapping; larger ones (hand-built
 * operands, and the non-finite marker) take the scalar stage, which adds in int64. */
#define LANE_EXPONENT_MAX (1 << 29)

/* Four lanes: s converts to double exactly (|s| < 2**51, the 2**52 + 2**51 magic-number
 * trick), rounds once to nearest-even f32, and adding k to a normal exponent field is
 * exact scaling; zero sums stay +0. Returns 0 when some lane is outside that case. */
static inline int encode4(const int64_t* s, __m128i k, uint32_t* out) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)s);
  const __m256i magic = _mm256_set1_epi64x(0x4338000000000000LL);
  const __m256d d = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(v, magic)),
                                  _mm256_set1_pd(6755399441055744.0));
  const __m128i bits = _mm_castps_si128(_mm256_cvtpd_ps(d));
  const __m128i zero = _mm_cmpeq_epi32(bits, _mm_setzero_si128());
  const __m256i shifted = _mm256_add_epi64(v, _mm256_set1_epi64x(INT64_C(1) << 51));
  const __m256i bad64 = _mm256_or_si256(
      _mm256_cmpgt_epi64(_mm256_setzero_si256(), shifted),
      _mm256_cmpgt_epi64(shifted, _mm256_set1_epi64x((INT64_C(1) << 52) - 1)));
  const __m128i biased = _mm_add_epi32(_mm_and_si128(_mm_srli_epi32(bits, 23), _mm_set1_epi32(0xff)), k);
  const __m128i bad32 = _mm_andnot_si128(
      zero, _mm_or_si128(_mm_cmplt_epi32(biased, _mm_set1_epi32(1)),
                         _mm_cmpgt_epi32(biased, _mm_set1_epi32(254))));
  if (_mm256_movemask_pd(_mm256_castsi256_pd(bad64)) | _mm_movemask_ps(_mm_castsi128_ps(bad32)))
    return 0;
  _mm_storeu_si128((__m128i*)out, _mm_andnot_si128(zero, _mm_add_epi32(bits, _mm_slli_epi32(k, 23))));
  return 1;
}

/* Four lanes with one normal scale 2**k (encode.h): only the 2**51 range is left to check. */
static inline int encode4_normal(const int64_t* s, __m128i kbits, uint32_t* out) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)s);
  const __m256i shifted = _mm256_add_epi64(v, _mm256_set1_epi64x(INT64_C(1) << 51));
  const __m256i high = _mm256_srli_epi64(shifted, 52);
  if (!_mm256_testz_si256(high, high)) return 0;
  const __m256i magic = _mm256_set1_epi64x(0x4338000000000000LL);
  const __m256d d = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(v, magic)),
                                  _mm256_set1_pd(6755399441055744.0));
  const __m128i bits = _mm_castps_si128(_mm256_cvtpd_ps(d));
  const __m128i zero = _mm_cmpeq_epi32(bits, _mm_setzero_si128());
  _mm_storeu_si128((__m128i*)out, _mm_andnot_si128(zero, _mm_add_epi32(bits, kbits)));
  return 1;
}

void dfp_encode_f32_avx2(const int64_t* s, size_t n, int32_t ea, const int32_t* eb,
                         size_t eb_stride, uint32_t* out) {
  size_t j = 0;
  if (eb_stride == 0 && dfp_normal_scale(ea, eb[0])) {
    const __m128i kbits = _mm_set1_epi32((int32_t)((uint32_t)(ea + eb[0]) << 23));
    for (; j + 4 <= n; j += 4)
      if (!encode4_normal(s + j, kbits, out + j))
        for (size_t i = j; i < j + 4; ++i) out[i] = dfp_encode_f32(s[i], ea, eb[0]);
  } else if (ea >= -LANE_EXPONENT_MAX && ea <= LANE_EXPONENT_MAX) {
    for (; j + 4 <= n; j += 4) {
      const __m128i e = eb_stride ? _mm_loadu_si128((const __m128i*)(eb + j)) : _mm_set1_epi32(eb[0]);
      const int wide = _mm_movemask_ps(_mm_castsi128_ps(
          _mm_or_si128(_mm_cmpgt_epi32(e, _mm_set1_epi32(LANE_EXPONENT_MAX)),
                       _mm_cmplt_epi32(e, _mm_set1_epi32(-LANE_EXPONENT_MAX)))));
      if (wide || !encode4(s + j, _mm_add_epi32(e, _mm_set1_epi32(ea)), out + j))
        for (size_t i = j; i < j + 4; ++i) out[i] = dfp_encode_f32(s[i], ea, eb[i * eb_stride]);
    }
  }
  for (; j < n; ++j) out[j] = dfp_encode_f32(s[j], ea, eb[j * eb_stride]);
}

/* Four lanes a vector, where the baseline build's loop adds two at a time; the last few one
 * by one (vpmaskmovq stores are slow on AMD's cores). */
void dfp_add_runs_avx2(int64_t* dst, const size_t* offsets, const int64_t* src, size_t n, size_t runs) {
  for (size_t r = 0; r < runs; ++r, src += n) {
    int64_t* d = dst + offsets[r];
    size_t j = 0;
    for (; j + 4 <= n; j += 4)
      _mm256_storeu_si256((__m256i*)(d + j), _mm256_add_epi64(_mm256_loadu_si256((const __m256i*)(d + j)),
                                                              _mm256_loadu_si256((const __m256i*)(src + j))));
    for (; j < n; ++j) d[j] += src[j];
  }
}

void dfp_add_runs_s32_avx2(int64_t* dst, const size_t* offsets, const int32_t* src, size_t n, size_t runs) {
  for (size_t r = 0; r < runs; ++r, src += n) {
    int64_t* d = dst + offsets[r];
    size_t j = 0;
    for (; j + 4 <= n; j += 4)
      _mm256_storeu_si256((__m256i*)(d + j),
                          _mm256_add_epi64(_mm256_loadu_si256((const __m256i*)(d + j)),
                                           _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i*)(src + j)))));
    for (; j < n; ++j) d[j] += src[j];
  }
}

/* Four sums a step: the logical shift's low halves and the masked low parts, each gathered
 * into the vector's low 128 bits, then packed (unsigned saturation, exact: both fit). */
void dfp_split_sums_avx2(const int64_t* s, size_t n, int low_bits, int low_bytes, uint32_t* high, void* low) {
  const __m256i mask = _mm256_set1_epi64x((INT64_C(1) << low_bits) - 1);
  const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m128i count = _mm_cvtsi32_si128(low_bits);
  size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(s + j));
    const __m128i h = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_srl_epi64(v, count), evens));
    const __m128i l = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_and_si256(v, mask), evens));
    _mm_storeu_si128((__m128i*)(high + j), h);
    const __m128i l16 = _mm_packus_epi32(l, l);
    if (low_bytes == 1) {
      const int32_t l8 = _mm_cvtsi128_si32(_mm_packus_epi16(l16, l16));
      memcpy((uint8_t*)low + j, &l8, 4);
    } else {
      _mm_storel_epi64((__m128i*)((uint16_t*)low + j), l16);
    }
  }
  dfp_split_sums_portable(s + j, n - j, low_bits, low_bytes, high + j,
                          (uint8_t*)low + j * (size_t)low_bytes);
}

void dfp_stream_rows_avx2(const uint32_t* src, size_t rows, size_t cols, uint32_t* dst, size_t ldo) {
  for (size_t r = 0; r < rows; ++r, src += cols, dst += ldo)
    for (size_t j = 0; j < cols; j += 8)
      _mm256_stream_si256((__m256i*)(dst + j), _mm256_load_si256((const __m256i*)(src + j)));
}
