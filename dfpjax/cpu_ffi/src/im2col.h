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

/* Packs rows [row0, row0 + panels * width) of a view with `rows` rows, columns [k0, k1)
 * (k0 even, k1 - k0 <= 2 * DFP_KC_PAIRS), as `panels` micro-panels [pairs][width][2] at
 * dst + i * panel_stride. Rows past the view are zero. */
void dfp_im2col_pack_pixels(const dfp_patches* p, size_t rows, size_t row0, int width, size_t panels,
                            size_t k0, size_t k1, int16_t* dst, size_t panel_stride);
void dfp_im2col_pack_taps(const dfp_patches* p, size_t rows, size_t row0, int width, size_t panels,
                          size_t k0, size_t k1, int16_t* dst, size_t panel_stride);

#endif
