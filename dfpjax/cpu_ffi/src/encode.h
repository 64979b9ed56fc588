/* Exact output stage of spec section 3: fl(S) * 2**k for an exact integer S.
 * Integer-only (no float arithmetic), so flush-to-zero modes cannot change it; the
 * pure-JAX reference (numerics/floatbits.py: encode_scaled) is the same algorithm. Exponent
 * sums are formed in int64: hand-built operands with exponents near +-2**31 give +-Inf or
 * +-0 as the exact result does, never a wrapped scale. */
#ifndef DFPJAX_ENCODE_H_
#define DFPJAX_ENCODE_H_

#include <stdint.h>

typedef struct {
  int precision;  /* significant bits, implicit one included */
  int bias, emin, emax, width;
} dfp_float_format;

static const dfp_float_format kDfpF32 = {24, 127, -126, 127, 32};
static const dfp_float_format kDfpBF16 = {8, 127, -126, 127, 16};
static const dfp_float_format kDfpF16 = {11, 15, -14, 15, 16};

static inline int dfp_bit_length64(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

/* v * 2**-r rounded to nearest, ties to even (r >= 0). */
static inline uint64_t dfp_round_shift_right(uint64_t v, int r) {
  if (r == 0) return v;
  if (r > 64) return 0;
  uint64_t q = r == 64 ? 0 : v >> r;
  uint64_t rem = r == 64 ? v : v & ((UINT64_C(1) << r) - 1);
  uint64_t half = UINT64_C(1) << (r - 1);
  return q + (rem > half || (rem == half && (q & 1)));
}

/* Bit pattern of fl(S) * 2**k in the given format (round to precision once, then
 * IEEE scaling: Inf above the range, nearest-even subnormals below it; 0 -> +0). k is the
 * int64 sum of two int32 exponents, so |k| <= 2**32 and no step below overflows. */
static inline uint32_t dfp_encode_scaled(int64_t s, int64_t k, const dfp_float_format* f) {
  if (s == 0) return 0;
  uint32_t sign = s < 0 ? UINT32_C(1) << (f->width - 1) : 0;
  uint64_t mag = s < 0 ? (uint64_t)0 - (uint64_t)s : (uint64_t)s;
  int n = dfp_bit_length64(mag);
  int p = f->precision;
  uint64_t sig = n > p ? dfp_round_shift_right(mag, n - p) : mag << (p - n);
  int64_t lead = n - 1 + k;
  if (sig >> p) { sig >>= 1; lead += 1; }
  uint32_t bits;
  if (lead > f->emax) {
    bits = (uint32_t)((1 << (f->width - 1 - (p - 1))) - 1) << (p - 1);  /* Inf */
  } else if (lead >= f->emin) {
    bits = ((uint32_t)(lead + f->bias) << (p - 1)) | (uint32_t)(sig & ((UINT64_C(1) << (p - 1)) - 1));
  } else {
    const int64_t shift = f->emin - lead;
    bits = (uint32_t)dfp_round_shift_right(sig, shift > 2 * p + 2 ? 2 * p + 2 : (int)shift);
  }
  return sign | bits;
}

/* The exponent INT32_MAX marks an operand that held NaN or Inf (spec section 2). */
#define DFP_NONFINITE_EXPONENT 0x7fffffff

/* Scales 2**k, DFP_NORMAL_SCALE_MIN <= k <= DFP_NORMAL_SCALE_MAX, under which every sum with
 * 1 <= |s| < 2**51 (rounding up to at most 2**51) lands on a normal float32: the fast output
 * stages scale such a sum by adding k to its float's exponent field (1 + 127 - 126 >= 1,
 * 51 + 127 + 76 <= 254). */
#define DFP_NORMAL_SCALE_MIN (-126)
#define DFP_NORMAL_SCALE_MAX 76

/* Whether 2**(ea + eb) is such a scale (neither exponent the non-finite marker). */
static inline int dfp_normal_scale(int32_t ea, int32_t eb) {
  const int64_t k = (int64_t)ea + eb;
  return ea != DFP_NONFINITE_EXPONENT && eb != DFP_NONFINITE_EXPONENT && k >= DFP_NORMAL_SCALE_MIN &&
         k <= DFP_NORMAL_SCALE_MAX;
}

/* One f32 output element: NaN for a non-finite operand, else fl(s) * 2**(ea + eb). */
static inline uint32_t dfp_encode_f32(int64_t s, int32_t ea, int32_t eb) {
  if (ea == DFP_NONFINITE_EXPONENT || eb == DFP_NONFINITE_EXPONENT) return 0x7fc00000u;
  return dfp_encode_scaled(s, (int64_t)ea + eb, &kDfpF32);
}

#endif
