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

typedef struct {
  const int16_t* x;
  const dfp_conv_shape* shape;
  size_t channel0; /* g * cin */
} dfp_patches;

enum { DFP_IM2COL_MAX_ROWS = 128 }; /* rows one call packs, at most */

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
} /* rows one call packs, at most */

/* Packs rows [row0, row0 + panels * width) of a view with `rows` rows, columns [k0, k1)
 * (k0 even, k1 - k0 <= 2 * DFP_KC_PAIRS), as `panels` micro-panels [pairs][width][2] at
 * dst + i * panel_stride. Rows past the view are zero. */
void dfp_im2col_pack_pixels(const dfp_patches* p, size_t rows, size_t row0, int width, size_t panels,
                            size_t k0, size_t k1, int16_t* dst, size_t panel_stride);
void dfp_im2col_pack_taps(const dfp_patches* p, size_t rows, size_t row0, int width, size_t panels,
                          size_t k0, size_t k1, int16_t* dst, size_t panel_stride);

#endif
