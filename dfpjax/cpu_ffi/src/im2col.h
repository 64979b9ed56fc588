/* Implicit im2col: packs convolution patches straight into the VNNI pair layout of the
 * microkernels (pack.h), one K block at a time, so no patch matrix is ever materialized.
 * Two views of the patches of one feature group g of x (geometry in dfp_kernel.h):
 *   pixels view (forward):        row = output pixel (n, p), column = tap * cin + c
 *   taps view (backward-weights): row = tap * cin + c,       column = output pixel (n, p)
 * where tap = (t0 * win1 + t1) * win2 + t2 and pixel = ((n * out0 + p0) * out1 + p1) * out2 + p2,
 * the element being x[n][u(p, t)][g * cin + c], or zero where the tap reads padding. */
#ifndef DFPJAX_IM2COL_H_
#define DFPJAX_IM2COL_H_

#include <stddef.h>
#include <stdint.h>

#include "dfp_kernel.h"
#include "isa_config.h"
#include "pack.h"

typedef struct {
  const int16_t* x;
  const dfp_conv_shape* shape;
  size_t channel0; /* g * cin */
} dfp_patches;

enum {
  DFP_IM2COL_MAX_ROWS = 256, /* rows one call packs, at most */
  DFP_IM2COL_MAX_WIDTH = 8,  /* the widest micro-panel (the largest MR) */
};

/* 1 if the patches are x itself (one tap, stride 1, no padding, no dilation): a 1x1
 * convolution is a plain GEMM, and both views read x as it lies. */
static inline int dfp_patches_dense(const dfp_conv_shape* s) {
  for (int d = 0; d < 3; ++d)
    if (s->window[d] != 1 || s->stride[d] != 1 || s->pad_lo[d] != 0 || s->lhs_dil[d] != 1 || s->in[d] != s->out[d])
      return 0;
  return 1;
}

/* Input coordinate of tap t at output position p along dimension d, or -1 for padding. */
static inline int64_t dfp_input_coordinate(const dfp_conv_shape* s, int d, size_t p, size_t t) {
  int64_t u = (int64_t)p * s->stride[d] + (int64_t)t * s->rhs_dil[d] - s->pad_lo[d];
  if (u < 0) return -1;
  if (s->lhs_dil[d] != 1) {
    if (u % s->lhs_dil[d]) return -1;
    u /= s->lhs_dil[d];
  }
  return u < (int64_t)s->in[d] ? u : -1;
}

/* Index of the input pixel (n, u(p, t)) over the whole batch, or -1 for padding. */
static inline int64_t dfp_input_pixel(const dfp_conv_shape* s, size_t n, const size_t p[3],
                                      const size_t t[3]) {
  const int64_t u0 = dfp_input_coordinate(s, 0, p[0], t[0]);
  const int64_t u1 = dfp_input_coordinate(s, 1, p[1], t[1]);
  const int64_t u2 = dfp_input_coordinate(s, 2, p[2], t[2]);
  if ((u0 | u1 | u2) < 0) return -1;
  return (int64_t)(((n * s->in[0] + (size_t)u0) * s->in[1] + (size_t)u1) * s->in[2] + (size_t)u2);
}

/* The input pixel (over the batch) that tap (0, 0, 0) of output position p of image n reads,
 * when every tap of the window reads inside the input (no padding, no lhs dilation), else -1:
 * the common case, where tap t reads pixel origin + dfp_tap_offset(s, t) and no tap needs the
 * checks of dfp_input_pixel. */
static inline int64_t dfp_window_origin(const dfp_conv_shape* s, size_t n, const size_t p[3]) {
  int64_t pixel = (int64_t)n;
  for (int d = 0; d < 3; ++d) {
    const int64_t u = (int64_t)p[d] * s->stride[d] - s->pad_lo[d];
    if (s->lhs_dil[d] != 1 || u < 0 || u + ((int64_t)s->window[d] - 1) * s->rhs_dil[d] >= (int64_t)s->in[d])
      return -1;
    pixel = pixel * (int64_t)s->in[d] + u;
  }
  return pixel;
}

/* Pixels from a window's origin to the one its tap t reads (see dfp_window_origin). */
static inline size_t dfp_tap_offset(const dfp_conv_shape* s, const size_t t[3]) {
  return ((t[0] * (size_t)s->rhs_dil[0]) * s->in[1] + t[1] * (size_t)s->rhs_dil[1]) * s->in[2] +
         t[2] * (size_t)s->rhs_dil[2];
}

static inline void dfp_split_tap(const dfp_conv_shape* s, size_t tap, size_t t[3]) {
  t[2] = tap % s->window[2];
  t[1] = tap / s->window[2] % s->window[1];
  t[0] = tap / s->window[2] / s->window[1];
}

/* Output pixel index within an image -> p; returns the image (for indices over the batch). */
static inline size_t dfp_split_pixel(const dfp_conv_shape* s, size_t pixel, size_t p[3]) {
  p[2] = pixel % s->out[2];
  pixel /= s->out[2];
  p[1] = pixel % s->out[1];
  pixel /= s->out[1];
  p[0] = pixel % s->out[0];
  return pixel / s->out[0];
}

/* (n, p) -> the next output pixel over the batch: p2 fastest, then p1, p0, n. */
static inline void dfp_next_pixel(const dfp_conv_shape* s, size_t* n, size_t p[3]) {
  if (++p[2] == s->out[2]) {
    p[2] = 0;
    if (++p[1] == s->out[1]) {
      p[1] = 0;
      if (++p[0] == s->out[0]) p[0] = 0, ++*n;
    }
  }
}

/* Pixels from (n, p) on, at most `limit`, whose windows lie inside the input along one output
 * row, given that (n, p)'s does (dfp_window_origin): the window's origin steps stride[2] input
 * pixels a pixel, so one pixel's row of x is the last one's moved by a constant. */
static inline size_t dfp_inside_run(const dfp_conv_shape* s, const size_t p[3], size_t limit) {
  const int64_t last = (int64_t)s->in[2] - 1 - ((int64_t)s->window[2] - 1) * s->rhs_dil[2] + s->pad_lo[2];
  size_t end = (size_t)(last / s->stride[2]) + 1; /* the first p2 whose window leaves the input */
  if (end > s->out[2]) end = s->out[2];
  return end - p[2] < limit ? end - p[2] : limit;
}

/* Elements of x from one pixel's window origin in such a run to the next one's. */
static inline size_t dfp_run_stride(const dfp_conv_shape* s) { return (size_t)s->stride[2] * s->groups * s->cin; }

/* (n, p), the first of a run of `pixels` pixels along one output row -> the pixel after the run. */
static inline void dfp_skip_run(const dfp_conv_shape* s, size_t pixels, size_t* n, size_t p[3]) {
  p[2] += pixels - 1; /* the run's last pixel, then the next one */
  dfp_next_pixel(s, n, p);
}

/* Both views walk the columns (pixels view) or rows (taps view) tap * cin + c in "units": runs
 * of taps whose elements lie contiguously in x. A unit is a whole window row along the last
 * dimension when the input has one feature group and no dilation there (a 7x7 stem on 3
 * channels copies 7 runs of 21, not 49 runs of 3), else one tap. Each unit costs one pointer
 * computation and at most one copy, and the taps advance without divisions. Backward-data's
 * col2im (conv.c) adds its columns back by the same units. */
typedef struct {
  size_t taps, elements; /* taps and elements (taps * cin) per unit */
  int whole_rows;
} dfp_unit_shape;

static inline dfp_unit_shape dfp_units_of(const dfp_conv_shape* s) {
  const int whole_rows = s->groups == 1 && s->rhs_dil[2] == 1 && s->lhs_dil[2] == 1;
  const size_t taps = whole_rows ? s->window[2] : 1;
  return (dfp_unit_shape){taps, taps * s->cin, whole_rows};
}

/* t: the first tap of a unit -> the first tap of the next one. */
static inline void dfp_next_unit(const dfp_conv_shape* s, const dfp_unit_shape* u, size_t t[3]) {
  t[2] += u->taps;
  if (t[2] == s->window[2]) {
    t[2] = 0;
    if (++t[1] == s->window[1]) t[1] = 0, ++t[0];
  }
}

/* Taps [*lo, *hi) of a unit that output position p reads inside the input along the last
 * dimension (all of a one-tap unit, which dfp_input_pixel checks): the others read padding. */
static inline void dfp_unit_taps(const dfp_conv_shape* s, const dfp_unit_shape* u, const size_t p[3], size_t* lo,
                                 size_t* hi) {
  *lo = 0;
  *hi = u->taps;
  if (!u->whole_rows) return;
  const int64_t u2 = (int64_t)p[2] * s->stride[2] - s->pad_lo[2];
  const int64_t first_in = u2 < 0 ? -u2 : 0;
  const int64_t end_in = (int64_t)s->in[2] - u2 < (int64_t)u->taps ? (int64_t)s->in[2] - u2 : (int64_t)u->taps;
  *lo = (size_t)first_in;
  *hi = end_in > first_in ? (size_t)end_in : *lo;
}

/* Packs rows [row0, row0 + panels * width) of a view with `rows` rows, columns [k0, k1)
 * (k0 even, k1 - k0 <= 2 * DFP_KC_PAIRS), as `panels` micro-panels [pairs][width][2] at
 * dst + i * panel_stride, by the path's copies (width <= DFP_IM2COL_MAX_WIDTH, panels *
 * width <= DFP_IM2COL_MAX_ROWS). Rows past the view are zero. */
void dfp_im2col_pack_pixels(const dfp_isa_config* cfg, const dfp_patches* p, size_t rows, size_t row0,
                            int width, size_t panels, size_t k0, size_t k1, int16_t* dst, size_t panel_stride);
void dfp_im2col_pack_taps(const dfp_isa_config* cfg, const dfp_patches* p, size_t rows, size_t row0,
                          int width, size_t panels, size_t k0, size_t k1, int16_t* dst, size_t panel_stride);

/* 1 if b is w as it lies (dfp_weight_view): its taps are the window's, in order. */
static inline int dfp_weights_plain(const dfp_conv_shape* s, const dfp_weight_view* v) {
  if (!v->mapped) return 1;
  for (int d = 0; d < 3; ++d)
    if (v->window[d] != s->window[d] || v->tap_first[d] != 0 || v->tap_step[d] != 1) return 0;
  return !v->transposed && !v->features_major;
}

/* The forward convolution's B operand w[(t, c)][g * cout + o] (K = taps * cin rows, the
 * group's cout columns) read through the view: columns [col0, col0 + width) of group g packed
 * as dfp_pack_panel packs a panel (K blocks of kc pairs), with its bounds and status, straight
 * from b. Each tap's cin rows lie in b as a matrix of their own, packed by the path's copies
 * where taps start on whole pairs (cin even), else element by element. */
int dfp_pack_weights_panel(const dfp_isa_config* cfg, const int16_t* b, const dfp_conv_shape* s,
                           const dfp_weight_view* v, size_t g, size_t col0, int width, size_t kc, int16_t* dst,
                           uint64_t* bounds);

#endif
