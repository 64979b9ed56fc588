#include "im2col.h"

#include <string.h>

#include "pack.h"

/* &x[n][u(p, t)][channel0], or NULL where the tap reads padding. */
static inline const int16_t* tap_source(const dfp_patches* P, size_t n, const size_t p[3],
                                        const size_t t[3]) {
  const int64_t pixel = dfp_input_pixel(P->shape, n, p, t);
  return pixel < 0 ? NULL : P->x + (size_t)pixel * P->shape->groups * P->shape->cin + P->channel0;
}

/* n elements from src to dst: for runs of 8 to 32 (a stem's window rows of 21) two fixed-size
 * copies, head and tail, which the compiler inlines, instead of a library call per run. */
static inline void copy_run(int16_t* dst, const int16_t* src, size_t n) {
  if (n >= 16 && n <= 32) {
    memcpy(dst, src, 32);
    memcpy(dst + n - 16, src + n - 16, 32);
  } else if (n >= 8 && n < 16) {
    memcpy(dst, src, 16);
    memcpy(dst + n - 8, src + n - 8, 16);
  } else {
    memcpy(dst, src, n * sizeof(int16_t));
  }
}

/* Elements [a, b) of the unit starting at tap t (its element 0 has index `first`) for output
 * pixel (n, p), whose window reaches outside the input, into out[0, b - a): the taps the input
 * covers copied at once, zero elsewhere. */
static void copy_unit(const dfp_patches* P, const dfp_unit_shape* u, size_t n, const size_t p[3], const size_t t[3],
                      size_t first, size_t a, size_t b, int16_t* out) {
  const dfp_conv_shape* s = P->shape;
  size_t lo, hi;
  dfp_unit_taps(s, u, p, &lo, &hi);
  const size_t tap[3] = {t[0], t[1], t[2] + lo};
  const int16_t* src = lo < hi ? tap_source(P, n, p, tap) : NULL;
  size_t valid0 = a, valid1 = a;
  if (src) {
    /* Element first + e of the unit is src[e - lo * cin]. */
    valid0 = first + lo * s->cin > a ? first + lo * s->cin : a;
    valid1 = first + hi * s->cin < b ? first + hi * s->cin : b;
    if (valid0 > b) valid0 = b;
    if (valid1 < valid0) valid1 = valid0;
    memcpy(out + (valid0 - a), src + (valid0 - first - lo * s->cin), (valid1 - valid0) * sizeof(int16_t));
  }
  if (valid0 > a) memset(out, 0, (valid0 - a) * sizeof(int16_t));
  if (b > valid1) memset(out + (valid1 - a), 0, (b - valid1) * sizeof(int16_t));
}

/* The part [a, b) of a range of the index tap * cin + c that the unit starting at tap t and
 * index `first` covers; src: where the part lies in x, in elements from the element of a
 * window's origin (dfp_window_origin) when the window is inside the input. */
typedef struct {
  size_t t[3], first, a, b, src;
} unit_part;

/* The units that span [lo, hi) of the index, placed once for the pixel loops (at most
 * hi - lo + 1 of them); returns their count. */
static size_t place_units(const dfp_patches* P, const dfp_unit_shape* u, size_t lo, size_t hi, unit_part* parts) {
  const dfp_conv_shape* s = P->shape;
  size_t count = 0, first = lo / u->elements * u->elements, t[3];
  dfp_split_tap(s, first / s->cin, t);
  for (; first < hi; first += u->elements, dfp_next_unit(s, u, t), ++count) {
    unit_part* part = &parts[count];
    memcpy(part->t, t, sizeof t);
    part->first = first;
    part->a = first > lo ? first : lo;
    part->b = first + u->elements < hi ? first + u->elements : hi;
    part->src = dfp_tap_offset(s, t) * s->groups * s->cin + P->channel0 + (part->a - first);
  }
  return count;
}

/* The parts' elements of output pixel (n, p), whose window reaches outside the input, into out,
 * part j at out + parts[j].a - lo, by copy_unit's checks. */
static void copy_edge_parts(const dfp_patches* P, const dfp_unit_shape* u, size_t n, const size_t p[3],
                            const unit_part* parts, size_t count, size_t lo, int16_t* out) {
  for (size_t j = 0; j < count; ++j)
    copy_unit(P, u, n, p, parts[j].t, parts[j].first, parts[j].a, parts[j].b, out + (parts[j].a - lo));
}

/* The parts' elements of output pixel (n, p) into out, part j at out + parts[j].a - lo: where
 * the window is inside the input (most pixels) one run per part from its origin, else by
 * copy_unit's checks. */
static void copy_parts(const dfp_patches* P, const dfp_unit_shape* u, size_t n, const size_t p[3],
                       const unit_part* parts, size_t count, size_t lo, int16_t* out) {
  const int64_t origin = dfp_window_origin(P->shape, n, p);
  if (origin < 0) {
    copy_edge_parts(P, u, n, p, parts, count, lo, out);
    return;
  }
  const int16_t* x = P->x + (size_t)origin * P->shape->groups * P->shape->cin;
  for (size_t j = 0; j < count; ++j)
    copy_run(out + (parts[j].a - lo), x + parts[j].src, parts[j].b - parts[j].a);
}

/* Zeroes the words of each panel that the copies leave as padding (pack.h: dfp_pack_block):
 * all of a partial panel, and the last pair of a whole one for an odd column count (the
 * stem's K = 147: zeroing its whole panels was 2% of its forward kernel). Returns the pairs. */
static size_t clear_padding(size_t rows, size_t row0, int width, size_t panels, size_t k0, size_t k1,
                            int16_t* dst, size_t panel_stride) {
  const size_t pairs = (k1 - k0 + 1) / 2, pair_words = (size_t)width * 2;
  for (size_t q = 0; q < panels; ++q) {
    if (row0 + (q + 1) * (size_t)width > rows)
      memset(dst + q * panel_stride, 0, pairs * pair_words * sizeof(int16_t));
    else if ((k1 - k0) % 2)
      memset(dst + q * panel_stride + (pairs - 1) * pair_words, 0, pair_words * sizeof(int16_t));
  }
  return pairs;
}

/* Rows of panel q that exist in a view of `rows` rows. */
static size_t valid_rows(size_t rows, size_t row0, int width, size_t q) {
  const size_t first = row0 + q * (size_t)width;
  return first >= rows ? 0 : rows - first < (size_t)width ? rows - first : (size_t)width;
}

void dfp_im2col_pack_pixels(const dfp_isa_config* cfg, const dfp_patches* P, size_t rows, size_t row0,
                            int width, size_t panels, size_t k0, size_t k1, int16_t* dst, size_t panel_stride) {
  const dfp_conv_shape* s = P->shape;
  const size_t channels = s->groups * s->cin;
  const int dense = dfp_patches_dense(s);
  const dfp_unit_shape u = dfp_units_of(s);
  int16_t buffer[DFP_IM2COL_MAX_WIDTH][2 * DFP_KC_PAIRS];
  clear_padding(rows, row0, width, panels, k0, k1, dst, panel_stride);
  unit_part parts[2 * DFP_KC_PAIRS + 1];
  size_t count = 0, p[3] = {0, 0, 0}, n = 0;
  if (!dense) {
    count = place_units(P, &u, k0, k1, parts);
    n = dfp_split_pixel(s, row0, p);
  }
  /* A panel of pixels inside the input along one output row packs each part straight from x,
   * its rows stride[2] pixels apart, not through the buffer that copy_parts fills: the 3x3
   * layers' window rows (conv2_3x3's forward and backward-data kernels 3-4% shorter, Zen 3)
   * and, a pair that straddles two parts word by word, the stem's rows of 21 (its patches of
   * one image packed in 0.40 ms against 0.47, one thread, Zen 3). */
  const size_t run_stride = dfp_run_stride(s);
  for (size_t q = 0; q < panels; ++q) {
    const size_t first = row0 + q * (size_t)width, valid = valid_rows(rows, row0, width, q);
    if (valid == 0) continue;
    if (dense) {  /* row r is x[r][channel0 + k] */
      dfp_pack_block(cfg, P->x + first * channels + P->channel0, k0, k1, channels, 1, valid, width,
                     dst + q * panel_stride, 0);
      continue;
    }
    const int64_t origin = !dense && valid == (size_t)width ? dfp_window_origin(s, n, p) : -1;
    if (origin >= 0 && dfp_inside_run(s, p, valid) == valid) {
      const int16_t* x = P->x + (size_t)origin * channels;
      uint32_t* out = (uint32_t*)(dst + q * panel_stride);
      for (size_t j = 0; j < count; ++j) {
        const size_t a = parts[j].a + (parts[j].a - k0) % 2; /* the part's first pair of its own */
        if (a >= parts[j].b) continue;                       /* its one element ended the last pair */
        const size_t b = a + (parts[j].b - a) / 2 * 2;
        if (b > a)
          cfg->pack_rows(x + parts[j].src + (a - parts[j].a), (b - a) / 2, run_stride, valid, width,
                         out + (a - k0) / 2 * (size_t)width);
        if (b == parts[j].b) continue;
        /* Element b, the part's last, pairs with the next part's first (or the padding past k1). */
        const int16_t* low = x + parts[j].src + (b - parts[j].a);
        const int16_t* high = j + 1 < count ? x + parts[j + 1].src : NULL;
        for (size_t i = 0; i < valid; ++i)
          out[(b - k0) / 2 * (size_t)width + i] =
              (uint16_t)low[i * run_stride] | (high ? (uint32_t)(uint16_t)high[i * run_stride] << 16 : 0u);
      }
      dfp_skip_run(s, valid, &n, p);
      continue;
    }
    for (size_t i = 0; i < valid; ++i, dfp_next_pixel(s, &n, p)) copy_parts(P, &u, n, p, parts, count, k0, buffer[i]);
    dfp_pack_block(cfg, buffer[0], 0, k1 - k0, 2 * DFP_KC_PAIRS, 1, valid, width, dst + q * panel_stride, 0);
  }
}

/* A pair's row of words (at most the widest block's rows) cut into the panels of a K block. */
static void scatter_pair(const int16_t* pair_row, int width, size_t panels, size_t pair, int16_t* dst,
                         size_t panel_stride) {
  const size_t words = (size_t)width * 2;
  dst += pair * words;
  /* Constant sizes for the paths' widths, so that the copies are inlined. */
  if (width == 6)
    for (size_t q = 0; q < panels; ++q) memcpy(dst + q * panel_stride, pair_row + q * 12, 12 * sizeof(int16_t));
  else if (width == 8)
    for (size_t q = 0; q < panels; ++q) memcpy(dst + q * panel_stride, pair_row + q * 16, 16 * sizeof(int16_t));
  else
    for (size_t q = 0; q < panels; ++q) memcpy(dst + q * panel_stride, pair_row + q * words, words * sizeof(int16_t));
}

void dfp_im2col_pack_taps(const dfp_isa_config* cfg, const dfp_patches* P, size_t rows, size_t row0,
                          int width, size_t panels, size_t k0, size_t k1, int16_t* dst, size_t panel_stride) {
  const dfp_conv_shape* s = P->shape;
  const size_t channels = s->groups * s->cin;
  clear_padding(rows, row0, width, panels, k0, k1, dst, panel_stride);
  const size_t end = row0 + panels * (size_t)width < rows ? row0 + panels * (size_t)width : rows;
  if (end <= row0) return;
  if (dfp_patches_dense(s)) { /* element (r, k) is x[k][channel0 + r]: all the panels at once */
    dfp_pack_block(cfg, P->x + P->channel0 + row0, k0, k1, 1, channels, end - row0, width, dst, panel_stride);
    return;
  }
  const dfp_unit_shape u = dfp_units_of(s);
  unit_part parts[DFP_IM2COL_MAX_ROWS + 1];
  const size_t count = place_units(P, &u, row0, end, parts);
  /* The pairs of a run of pixels inside the input along one output row are a dense view per
   * part, with k-rows stride[2] pixels apart: packed by the path's column copy, as a 1x1
   * layer's. Where every part starts a panel (a 3x3 window's rows of 3 taps over an even cin),
   * a call per part (half the time of the pair-by-pair copies below on conv2_3x3's window rows,
   * Zen 3: its backward-weights kernel 4-5% shorter); else (the stem's rows of 21 on 6-lane
   * panels) a call per panel a part covers, each within one panel (the stem's packing of its
   * patches 0.37 -> 0.25 ms an image against the pair-by-pair copies, and its backward-weights
   * kernel 5-6% shorter, one thread, Zen 3). */
  int aligned = 1;
  for (size_t j = 0; j < count; ++j) aligned &= (parts[j].a - row0) % (size_t)width == 0;
  const size_t run_stride = dfp_run_stride(s);
  /* Any other pair (a window reaching outside the input, a run's odd last pixel): pixels k and
   * k + 1, each unit part read straight from x where the pixel's window lies inside the input
   * (else from edge, filled by copy_unit's checks), interleaved into pair_row (rows past the
   * view stay zero) and cut into the panels: no gather of the block. */
  static const int16_t zeros[DFP_IM2COL_MAX_ROWS]; /* the missing pixel of an odd last pair */
  int16_t edge[2][DFP_IM2COL_MAX_ROWS];
  int16_t pair_row[2 * DFP_IM2COL_MAX_ROWS];
  memset(pair_row + 2 * (end - row0), 0, (panels * (size_t)width - (end - row0)) * 2 * sizeof(int16_t));
  size_t p[3];
  size_t n = dfp_split_pixel(s, k0, p);
  for (size_t k = k0; k < k1;) {
    const int64_t first = dfp_window_origin(s, n, p);
    const size_t run = first >= 0 ? dfp_inside_run(s, p, k1 - k) / 2 * 2 : 0;
    if (run > 0) {
      const int16_t* x = P->x + (size_t)first * channels;
      int16_t* at = dst + (k - k0) / 2 * (size_t)width * 2;
      for (size_t j = 0; j < count; ++j) {
        if (aligned) {
          cfg->pack_columns(x + parts[j].src, run / 2, run_stride, parts[j].b - parts[j].a, width,
                            at + (parts[j].a - row0) / (size_t)width * panel_stride, panel_stride);
          continue;
        }
        for (size_t r = parts[j].a, lanes; r < parts[j].b; r += lanes) {
          const size_t lane = (r - row0) % (size_t)width;
          lanes = parts[j].b - r < (size_t)width - lane ? parts[j].b - r : (size_t)width - lane;
          cfg->pack_columns(x + parts[j].src + (r - parts[j].a), run / 2, run_stride, lanes, width,
                            at + (r - row0) / (size_t)width * panel_stride + 2 * lane, panel_stride);
        }
      }
      dfp_skip_run(s, run, &n, p);
      k += run;
      continue;
    }
    const int16_t* base[2]; /* part j of pixel k + h: base[h] + parts[j].src, or at edge[h] + parts[j].a - row0 */
    int inside[2];
    for (int h = 0; h < 2; ++h) {
      if (k + h == k1) {
        base[h] = zeros, inside[h] = 0;
        continue;
      }
      const int64_t origin = dfp_window_origin(s, n, p);
      inside[h] = origin >= 0;
      if (inside[h]) {
        base[h] = P->x + (size_t)origin * channels;
      } else {
        copy_edge_parts(P, &u, n, p, parts, count, row0, edge[h]);
        base[h] = edge[h];
      }
      dfp_next_pixel(s, &n, p);
    }
    for (size_t j = 0; j < count; ++j) {
      const size_t at = parts[j].a - row0;
      const int16_t* in0 = inside[0] ? base[0] + parts[j].src : base[0] + at;
      const int16_t* in1 = inside[1] ? base[1] + parts[j].src : base[1] + at;
      cfg->interleave_pairs(in0, in1, parts[j].b - parts[j].a, pair_row + 2 * at);
    }
    scatter_pair(pair_row, width, panels, (k - k0) / 2, dst, panel_stride);
    k += 2;
  }
}

int dfp_pack_weights_panel(const dfp_isa_config* cfg, const int16_t* b, const dfp_conv_shape* s,
                           const dfp_weight_view* v, size_t g, size_t col0, int width, size_t kc, int16_t* dst,
                           uint64_t* bounds) {
  const size_t cin = s->cin, k = s->window[0] * s->window[1] * s->window[2] * cin;
  const size_t valid = s->cout - col0 < (size_t)width ? s->cout - col0 : (size_t)width;
  /* b [taps][inner][last], inner and last its two channel dimensions, lies row-major or
   * features-major ([last][taps][inner]); last_stride and inner_stride are their strides. */
  const size_t inner = v->transposed ? s->cout : cin, last = cin * s->groups * s->cout / inner;
  const size_t b_taps = v->window[0] * v->window[1] * v->window[2];
  const size_t last_stride = v->features_major ? b_taps * inner : 1;
  const size_t inner_stride = v->features_major ? 1 : last;
  const size_t tap_stride = v->features_major ? inner : inner * last;
  /* Element (c, o) of a tap (row c of K, column col0 + o) is at tap_base[c * k_stride + o * o_stride]:
   * c indexes b's inner dimension and o its last, or with transposed weights the reverse. */
  const size_t o_stride = v->transposed ? inner_stride : last_stride;
  const size_t k_stride = v->transposed ? last_stride : inner_stride;
  const int16_t* base = b + (v->transposed ? g * cin * k_stride : g * s->cout * o_stride) + col0 * o_stride;
  if (valid < (size_t)width || k % 2) memset(dst, 0, (k + 1) / 2 * (size_t)width * 2 * sizeof(int16_t));
  int status = 0;
  for (size_t c0 = 0; c0 < k; c0 += 2 * kc, bounds += DFP_CHUNK_LEVELS) {
    const size_t c1 = c0 + 2 * kc < k ? c0 + 2 * kc : k;
    int16_t* block = dst + (c0 / 2) * (size_t)width * 2;
    for (size_t tap = c0 / cin; tap * cin < c1; ++tap) {
      size_t t[3], at = 0;
      dfp_split_tap(s, tap, t);
      for (int d = 0; d < 3; ++d) at = at * v->window[d] + (size_t)(v->tap_first[d] + v->tap_step[d] * (int64_t)t[d]);
      const int16_t* src = base + at * tap_stride;
      /* The tap's rows [a, e) of this block, as columns [a - tap * cin, e - tap * cin) of src. */
      const size_t a = c0 > tap * cin ? c0 : tap * cin, e = c1 < (tap + 1) * cin ? c1 : (tap + 1) * cin;
      if (cin % 2 == 0) {  /* a - c0 is even: the tap starts on a whole pair */
        dfp_pack_block(cfg, src, a - tap * cin, e - tap * cin, o_stride, k_stride, valid, width,
                       block + (a - c0) / 2 * (size_t)width * 2, 0);
        continue;
      }
      for (size_t r = a; r < e; ++r) {
        const int16_t* in = src + (r - tap * cin) * k_stride;
        int16_t* out = block + (r - c0) / 2 * (size_t)width * 2 + (r - c0) % 2;
        for (size_t o = 0; o < valid; ++o) out[2 * o] = in[o * o_stride];
      }
    }
    status |= dfp_block_bounds(cfg, block, (c1 - c0 + 1) / 2, width, bounds);
  }
  return status;
}
