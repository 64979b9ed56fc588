#include "im2col.h"

#include <string.h>

#include "pack.h"

/* &x[n][u(p, t)][channel0], or NULL where the tap reads padding. */
static inline const int16_t* tap_source(const dfp_patches* P, size_t n, const size_t p[3],
                                        const size_t t[3]) {
  const int64_t pixel = dfp_input_pixel(P->shape, n, p, t);
  return pixel < 0 ? NULL : P->x + (size_t)pixel * P->shape->groups * P->shape->cin + P->channel0;
}

/* Where fill_row writes: a contiguous row, or -- with an even channel count, where every
 * run starts and ends on a pair boundary -- straight into one lane of a packed panel. */
typedef struct {
  int16_t* row;
  uint32_t* lane; /* pair j at lane[j * stride] */
  size_t stride;
} row_sink;

static inline void sink_copy(const row_sink* o, size_t at, const int16_t* src, size_t len) {
  if (o->row) {
    memcpy(o->row + at, src, len * sizeof(int16_t));
    return;
  }
  uint32_t* lane = o->lane + at / 2 * o->stride;
  for (size_t j = 0; j < len / 2; ++j) {
    uint32_t w;
    memcpy(&w, src + 2 * j, sizeof w);
    lane[j * o->stride] = w;
  }
}

static inline void sink_zero(const row_sink* o, size_t at, size_t len) {
  if (o->row) {
    memset(o->row + at, 0, len * sizeof(int16_t));
    return;
  }
  uint32_t* lane = o->lane + at / 2 * o->stride;
  for (size_t j = 0; j < len / 2; ++j) lane[j * o->stride] = 0;
}

/* Columns [k0, k1) of one pixels-view row. A "unit" is a run of taps whose elements lie
 * contiguously in x: a whole window row along the last dimension when the input has one
 * feature group and no dilation there (a 7x7 stem on 3 channels copies 7 runs of 21, not
 * 49 runs of 3), else one tap. Each unit is one pointer computation and at most one copy. */
static void fill_row(const dfp_patches* P, size_t row, size_t k0, size_t k1, const row_sink* dst) {
  const dfp_conv_shape* s = P->shape;
  const int whole_rows = s->groups == 1 && s->rhs_dil[2] == 1 && s->lhs_dil[2] == 1;
  const size_t unit_taps = whole_rows ? s->window[2] : 1, unit = unit_taps * s->cin;
  size_t p[3], t[3];
  const size_t n = dfp_split_pixel(s, row, p);
  for (size_t k = k0; k < k1;) {
    const size_t first = k - k % unit, end = first + unit < k1 ? first + unit : k1;
    dfp_split_tap(s, first / s->cin, t);
    /* Taps [lo, hi) of the unit read the input; the others read padding. */
    size_t lo = 0, hi = unit_taps;
    const int64_t u2 = (int64_t)p[2] * s->stride[2] - s->pad_lo[2];
    if (whole_rows) {
      const int64_t first_in = u2 < 0 ? -u2 : 0;
      const int64_t end_in = (int64_t)s->in[2] - u2 < (int64_t)unit_taps ? (int64_t)s->in[2] - u2
                                                                           : (int64_t)unit_taps;
      lo = (size_t)first_in;
      hi = end_in > first_in ? (size_t)end_in : lo;
      t[2] = lo;
    }
    const int16_t* src = lo < hi ? tap_source(P, n, p, t) : NULL;
    size_t valid0 = k, valid1 = k;
    if (src) {
      /* Element first + e of the unit is src[e - lo * cin]. */
      valid0 = first + lo * s->cin > k ? first + lo * s->cin : k;
      valid1 = first + hi * s->cin < end ? first + hi * s->cin : end;
      if (valid0 > end) valid0 = end;
      if (valid1 < valid0) valid1 = valid0;
      sink_copy(dst, valid0 - k0, src + (valid0 - first - lo * s->cin), valid1 - valid0);
    }
    sink_zero(dst, k - k0, valid0 - k);
    sink_zero(dst, valid1 - k0, end - valid1);
    k = end;
  }
}

void dfp_im2col_pack_pixels(const dfp_patches* P, size_t rows, size_t row0, int width, size_t panels,
                            size_t k0, size_t k1, int16_t* dst, size_t panel_stride) {
  const size_t pairs = (k1 - k0 + 1) / 2;
  const int direct = P->shape->cin % 2 == 0;
  int16_t row[2 * DFP_KC_PAIRS];
  for (size_t q = 0; q < panels; ++q) {
    uint32_t* out = (uint32_t*)(dst + q * panel_stride);
    for (int i = 0; i < width; ++i) {
      const size_t r = row0 + q * (size_t)width + (size_t)i;
      const row_sink lane = {NULL, out + i, (size_t)width};
      if (r >= rows) {
        sink_zero(&lane, 0, 2 * pairs);
        continue;
      }
      if (direct) {
        fill_row(P, r, k0, k1, &lane);
        continue;
      }
      const row_sink contiguous = {row, NULL, 0};
      fill_row(P, r, k0, k1, &contiguous);
      if ((k1 - k0) & 1) row[k1 - k0] = 0; /* the odd tail's partner */
      sink_copy(&lane, 0, row, 2 * pairs);
    }
  }
}

void dfp_im2col_pack_taps(const dfp_patches* P, size_t rows, size_t row0, int width, size_t panels,
                          size_t k0, size_t k1, int16_t* dst, size_t panel_stride) {
  const dfp_conv_shape* s = P->shape;
  const size_t pairs = (k1 - k0 + 1) / 2;
  for (size_t q = 0; q < panels; ++q) memset(dst + q * panel_stride, 0, pairs * (size_t)width * 2 * sizeof(int16_t));
  const size_t end = row0 + panels * (size_t)width < rows ? row0 + panels * (size_t)width : rows;
  if (end <= row0) return;
  /* The taps the rows span, split once: the pixel loop below is the hot one. */
  const size_t tap0 = row0 / s->cin, ntaps = (end - 1) / s->cin - tap0 + 1;
  size_t taps[DFP_IM2COL_MAX_ROWS + 1][3];
  for (size_t j = 0; j < ntaps; ++j) dfp_split_tap(s, tap0 + j, taps[j]);
  size_t p[3];
  size_t n = dfp_split_pixel(s, k0, p);
  for (size_t k = k0; k < k1; ++k) {
    int16_t* column = dst + ((k - k0) / 2) * (size_t)width * 2 + (k - k0) % 2;
    for (size_t j = 0; j < ntaps; ++j) {
      const int16_t* src = tap_source(P, n, p, taps[j]);
      if (!src) continue;
      const size_t first = (tap0 + j) * s->cin;
      const size_t lo = first > row0 ? first : row0, hi = first + s->cin < end ? first + s->cin : end;
      size_t q = (lo - row0) / (size_t)width, i = (lo - row0) % (size_t)width;
      for (size_t r = lo; r < hi; ++r) {
        column[q * panel_stride + 2 * i] = src[r - first];
        if (++i == (size_t)width) i = 0, ++q;
      }
    }
    /* Next pixel: p2 fastest, then p1, p0, n. */
    if (++p[2] == s->out[2]) {
      p[2] = 0;
      if (++p[1] == s->out[1]) {
        p[1] = 0;
        if (++p[0] == s->out[0]) p[0] = 0, ++n;
      }
    }
  }
}
