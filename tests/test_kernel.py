"""The C kernel (every ISA path the CPU runs) against the pure-JAX reference and the oracle.

Spec section 3: the integer sum is exact for every input, so all paths and the reference
agree bit for bit, including where a plain INT32 accumulator would wrap.
"""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dfpjax import cpu_ffi
from dfpjax.numerics.quantization import NONFINITE_EXPONENT
from dfpjax.primitives import partitioning, reference, registry
from dfpjax.primitives.dot_general import dfp_dot_general_p
import spec_oracle


@functools.cache
def _kernel(lhs_kmajor, rhs_nmajor, out_dtype):
  params = dict(lhs_kmajor=lhs_kmajor, rhs_nmajor=rhs_nmajor, out_dtype=np.dtype(out_dtype))
  return jax.jit(lambda *args: dfp_dot_general_p.bind(*args, **params)[0])  # [product, flag]


@functools.cache
def _reference(lhs_kmajor, rhs_nmajor, out_dtype):
  return jax.jit(functools.partial(reference.dot, lhs_kmajor=lhs_kmajor, rhs_nmajor=rhs_nmajor,
                                   out_dtype=np.dtype(out_dtype)))


def _operands(rng, batch, m, k, n, lhs_kmajor, rhs_nmajor, scale=32767, ea=None, eb=None):
  a = rng.integers(-scale, scale + 1, (batch, m, k)).astype(np.int16)
  b = rng.integers(-scale, scale + 1, (batch, k, n)).astype(np.int16)
  ea = rng.integers(-40, 0, (batch, m)).astype(np.int32) if ea is None else ea
  eb = rng.integers(-40, 0, (1, 1)).astype(np.int32) if eb is None else eb
  a_in = np.swapaxes(a, 1, 2).copy() if lhs_kmajor else a
  b_in = np.swapaxes(b, 1, 2).copy() if rhs_nmajor else b
  return (a, ea, b, eb), (a_in, ea, b_in, eb)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint16 if x.itemsize == 2 else np.uint32)


def _assert_kernel_matches(args, lhs_kmajor, rhs_nmajor, out_dtype=np.float32):
  got = _kernel(lhs_kmajor, rhs_nmajor, out_dtype)(*map(jnp.asarray, args))
  want = _reference(lhs_kmajor, rhs_nmajor, out_dtype)(*map(jnp.asarray, args))
  np.testing.assert_array_equal(_bits(got), _bits(want))
  return np.asarray(got)


SHAPES = [(1, 1, 1, 1), (1, 3, 0, 5), (1, 7, 3, 5), (2, 6, 16, 16), (1, 13, 37, 29), (3, 17, 1, 33),
          (1, 65, 130, 47), (2, 100, 577, 70), (1, 1, 2049, 1), (1, 130, 600, 260)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["mk_kn", "km_kn", "mk_nk", "km_nk"])
def test_random_shapes_and_layouts(isa, shape, layout):
  rng = np.random.default_rng(hash(shape) % 2**32)
  batch, m, k, n = shape
  eb = rng.integers(-30, 0, (batch, n)).astype(np.int32)
  _, args = _operands(rng, batch, m, k, n, *layout, eb=eb)
  _assert_kernel_matches(args, *layout)


def test_matches_oracle(isa):
  rng = np.random.default_rng(5)
  (a, ea, b, eb), args = _operands(rng, 1, 9, 70, 11, False, False, eb=np.array([[-3]], np.int32))
  got = _assert_kernel_matches(args, False, False)
  want = spec_oracle.dot_2d(a[0], ea[0], b[0], eb[0, 0])
  np.testing.assert_array_equal(_bits(got[0]), _bits(want))


@pytest.mark.parametrize("k", [2**16, 2**16 + 3, 3 * 2**16 + 1])
@pytest.mark.parametrize("sign", [1, -1])
def test_adversarial_overflow_is_exact(isa, k, sign):
  """Every mantissa at +-32767 with equal signs: a wrapping INT32 sum is wrong after 2 products."""
  a = np.full((1, 3, k), 32767, np.int16)
  b = np.full((1, k, 2), sign * 32767, np.int16)
  a[0, 1, ::2] = -32767  # a row of alternating products: exact sum 0 or -32767**2
  zero = np.zeros((1, 1), np.int32)
  got = _assert_kernel_matches((a, zero, b, zero), False, False)
  exact = np.array([sign * k * 32767**2, sign * (k % 2) * -32767**2, sign * k * 32767**2], np.int64)
  np.testing.assert_array_equal(got[0, :, 0], exact.astype(np.float32))
  wrapped = np.int64(k * 32767**2).astype(np.int32)  # what plain INT32 accumulation returns
  assert got[0, 0, 0] != np.float32(sign * wrapped)


def _assert_row_times_itself(row):
  """7 rows of a and 17 columns of b, each `row`, make Cauchy-Schwarz tight: every sum is the
  row's squared norm, which the kernel must return exactly."""
  k = row.size
  a = np.broadcast_to(row.astype(np.int16), (1, 7, k)).copy()
  b = np.broadcast_to(row.astype(np.int16)[:, None], (1, k, 17)).copy()
  zero = np.zeros((1, 1), np.int32)
  got = _assert_kernel_matches((a, zero, b, zero), False, False)
  exact = (row.astype(np.int64)**2).sum()
  np.testing.assert_array_equal(got, np.full((1, 7, 17), exact, np.float32))


# Per chunk length: the largest value v with (2 * pairs) * v**2 <= INT32_MAX - 0xffff, and the
# largest last element that keeps (2 * pairs - 1) * v**2 + last**2 below INT32_MAX.
CARRY_LIMIT_ROWS = {2: (23170, 23171), 4: (16383, 16390), 8: (11585, 11588)}


@pytest.mark.parametrize("above", [False, True], ids=["below_limit", "above_limit"])
@pytest.mark.parametrize("pairs", sorted(CARRY_LIMIT_ROWS))
def test_chunk_sums_at_the_carry_limit(isa, pairs, above):
  """Rows equal to their columns make Cauchy-Schwarz tight: every chunk of `pairs` pairs sums
  to exactly its bound, (2 * pairs - 1) * v**2 + last**2. At INT32_MAX - 0xffff or below
  (last = v) the kernel may run such chunks, each starting from the remainder the previous one
  carried; above it (still below INT32_MAX) a chunk that long, started from the remainders
  these sums leave, would wrap int32, so it must take a shorter one. 8 pairs is the norm
  block; 2 and 4 pairs are the fine levels, whose bounds the kernel takes from the panels
  where the norm block's bound fails (as it does here for every tile)."""
  v, last = CARRY_LIMIT_ROWS[pairs]
  block = np.array([v] * (2 * pairs - 1) + [last if above else v], np.int64)
  assert ((block**2).sum() <= 2**31 - 1 - 0xffff) != above and (block**2).sum() <= 2**31 - 1
  _assert_row_times_itself(np.tile(block, 16 * 40 // block.size))  # two K blocks of 160 pairs


# Per chunk length, two chunks of a row: the first's squares sum to 2**31 - 2**16 - 1 (at most
# INT32_MAX - 0xffff, with low 16 bits 0xffff), the second's to INT32_MAX - 0xffff + 1.
ONE_PAST_THE_LIMIT_ROWS = {
    2: ([23021, 22990, 23169, 23497], [23151, 23048, 23092, 23388]),
    4: ([16352, 16260, 16244, 16274, 16237, 16289, 16324, 17073],
        [16211, 16382, 16244, 16265, 16369, 16219, 16184, 17173]),
    8: ([11461, 11467, 11401, 11463, 11493, 11559, 11390, 11505, 11472, 11477, 11418, 11430, 11581,
         11533, 11540, 13067],
        [11584, 11445, 11574, 11400, 11479, 11566, 11397, 11546, 11397, 11543, 11579, 11433, 11427,
         11433, 11498, 12968]),
}


@pytest.mark.parametrize("swapped", [False, True], ids=["halves_as_listed", "halves_swapped"])
@pytest.mark.parametrize("pairs", sorted(ONE_PAST_THE_LIMIT_ROWS))
def test_a_chunk_one_past_the_limit_is_not_taken(isa, pairs, swapped):
  """Rows equal to their columns, chunks of `pairs` pairs alternating between the two above:
  the first leaves its lanes a remainder of 0xffff, from which the second, one past
  INT32_MAX - 0xffff, reaches exactly 2**31. A bound of that level even one below a chunk's
  squared norm would take chunks that long, and the second would wrap int32. The second
  chunk's odd sum has one odd half, first or (swapped) second: a bound kept in units of two
  must round up either."""
  first, past = (np.array(r, np.int64) for r in ONE_PAST_THE_LIMIT_ROWS[pairs])
  past = np.roll(past, pairs) if swapped else past
  limit = 2**31 - 1 - 0xffff
  assert (first**2).sum() == 2**31 - 2**16 - 1 and (past**2).sum() == limit + 1
  # Two K blocks of 160 pairs, each starting with `first`.
  _assert_row_times_itself(np.tile(np.concatenate([first, past]), 16 * 40 // (4 * pairs)))


@pytest.mark.parametrize("operand", ["a", "b"])
@pytest.mark.parametrize("layout", [(False, False), (True, True)], ids=["mk_kn", "km_nk"])
def test_every_lane_bounds_its_own_chunks(isa, operand, layout):
  """One row of a (or column of b) at full scale among zeros, in each lane of the panels in
  turn, against an operand of full-scale values: that lane's products need a carry every
  pair, so a chunk length taken from any other lane's norms (all zero) would wrap int32."""
  m = n = 40  # 6-, 8-, 16- and 32-lane panels, the last 6-, 16- and 32-lane ones partial
  k = 512
  zero = np.zeros((1, 1), np.int32)
  for lane in range(m):
    a = np.full((1, m, k), 32767, np.int16)
    b = np.full((1, k, n), 32767, np.int16)
    if operand == "a":
      a[:] = 0
      a[0, lane] = 32767
    else:
      b[:] = 0
      b[0, :, lane] = 32767
    a_in = np.swapaxes(a, 1, 2).copy() if layout[0] else a
    b_in = np.swapaxes(b, 1, 2).copy() if layout[1] else b
    got = _assert_kernel_matches((a_in, zero, b_in, zero), *layout)
    want = np.zeros((m, n), np.float32)
    if operand == "a":
      want[lane] = k * 32767**2
    else:
      want[:, lane] = k * 32767**2
    np.testing.assert_array_equal(got[0], want)


def test_mixed_magnitudes_take_every_chunk_length(isa):
  """Blocks of large and small values make the kernel pick short and long safe chunks."""
  rng = np.random.default_rng(11)
  k = 4096
  scale = np.where((np.arange(k) // 96) % 3 == 0, 32767, 64)
  a = (rng.integers(-1000, 1001, (2, 37, k)) * scale // 1000).astype(np.int16)
  b = (rng.integers(0, 1001, (2, k, 45)) * scale[:, None] // 1000).astype(np.int16)
  zero = np.zeros((1, 1), np.int32)
  got = _assert_kernel_matches((a, zero, b, zero), False, False)
  s = np.einsum("bmk,bkn->bmn", a.astype(np.int64), b.astype(np.int64))
  assert np.abs(s).max() > 2**31  # the exact sums do leave int32
  np.testing.assert_array_equal(got, s.astype(np.float32))


@pytest.mark.parametrize("layout", [(False, False), (True, True)], ids=["mk_kn", "km_nk"])
def test_flat_against_gaussian_operands_are_exact(isa, layout):
  """Uniform mantissas over the whole range (a uniformly initialised layer's weights) against
  Gaussian ones: the norm block's bound fails for every tile and the fine levels' hold, so the
  tiles run 2- and 4-pair chunks; edge panels, three K blocks, sums past int32."""
  rng = np.random.default_rng(17)
  m, k, n = 53, 1700, 70
  a = np.clip(rng.normal(0, 6500, (1, m, k)), -32767, 32767).astype(np.int16)
  b = rng.integers(-32767, 32768, (1, k, n)).astype(np.int16)
  b[0, :, ::3] = np.abs(b[0, :, ::3])
  a[0, ::2] = np.abs(a[0, ::2])  # same-sign rows and columns: sums past 2**31
  a_in = np.swapaxes(a, 1, 2).copy() if layout[0] else a
  b_in = np.swapaxes(b, 1, 2).copy() if layout[1] else b
  zero = np.zeros((1, 1), np.int32)
  got = _assert_kernel_matches((a_in, zero, b_in, zero), *layout)
  s = np.einsum("bmk,bkn->bmn", a.astype(np.int64), b.astype(np.int64))
  assert np.abs(s).max() > 2**31
  np.testing.assert_array_equal(got, s.astype(np.float32))


@pytest.mark.parametrize("out_dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_output_types_and_range_ends(isa, out_dtype):
  """Rounding once to each output type; overflow to Inf and subnormal results at the ends."""
  rng = np.random.default_rng(3)
  (a, _, b, _), _ = _operands(rng, 1, 12, 40, 10, False, False)
  _, emin, emax = spec_oracle.FORMATS[np.dtype(out_dtype)]
  ea = np.array([[emax - 25, emax - 40, 0, -10, emin - 30, emin - 45, emin - 60, -140, 20, -3, 5,
                  emin - 35]], np.int32)
  eb = np.array([[-5]], np.int32)
  got = _assert_kernel_matches((a, ea, b, eb), False, False, out_dtype)
  want = spec_oracle.dot_2d(a[0], ea[0], b[0], eb[0, 0], out_dtype)
  np.testing.assert_array_equal(_bits(got[0]), _bits(want))
  assert np.isinf(got).any() and (got[0] != 0).any()


def test_scales_at_the_ends_of_the_normal_range(isa):
  """Rows scaled by 2**k at and just past the normal range (k = -126/-127, 76/77 around sums
  up to 2**42): the output stage's vector fast path and its scalar fallback agree bit for bit."""
  rng = np.random.default_rng(5)
  a = rng.integers(-32767, 32768, (1, 8, 4096)).astype(np.int16)
  a[0, ::2] = np.abs(a[0, ::2])  # same-sign rows: sums near 2**42
  b = np.abs(rng.integers(-32767, 32768, (1, 4096, 20))).astype(np.int16)
  ea = np.array([[-126, -127, 76, 77, -170, 50, -300, 100]], np.int32)
  got = _assert_kernel_matches((a, ea, b, np.zeros((1, 1), np.int32)), False, False)
  row4 = np.abs(got[0, 4])
  assert np.isinf(got[0, 7]).any() and ((row4 > 0) & (row4 < 2.0**-126)).any()


@pytest.mark.parametrize("k", [64, 147, 576])
def test_one_k_block_encodes_whole_tiles_from_the_lanes(isa, k):
  """A reduction of one K block (K <= 576) is encoded tile by tile, straight from the
  microkernel's int32 lanes and carries where a tile is whole and its rows' scales are normal:
  same-sign sums past 2**31 (carried chunks), zero rows, scales at both ends of the normal
  range, a row just past each end (its tiles take the int64 stage) and edge tiles (48 rows and
  96 columns are whole tiles of every path, the rest edges) equal the reference bit for bit."""
  rng = np.random.default_rng(k)
  m, n = 53, 103
  a = rng.integers(-32767, 32768, (1, m, k)).astype(np.int16)
  a[0, ::2] = np.abs(a[0, ::2])
  a[0, 3] = 0
  b = np.abs(rng.integers(-32767, 32768, (1, k, n))).astype(np.int16)
  ea = np.resize(np.array([-126, 76, -20, 0, 76, -126, 30, -100], np.int32), (1, m))
  ea[0, 33], ea[0, 42] = -127, 77
  got = _assert_kernel_matches((a, ea, b, np.zeros((1, 1), np.int32)), False, False)
  s = np.einsum("bmk,bkn->bmn", a.astype(np.int64), b.astype(np.int64))
  assert np.abs(s).max() > 2**31 and (got[0, 3] == 0).all() and not np.signbit(got[0, 3]).any()


def test_nonfinite_exponent_makes_output_nan(isa):
  rng = np.random.default_rng(4)
  (a, ea, b, eb), _ = _operands(rng, 2, 5, 8, 6, False, False)
  ea = ea.copy()
  ea[1, :] = NONFINITE_EXPONENT  # batch element 1's lhs held a NaN
  got = _assert_kernel_matches((a, ea, b, eb), False, False)
  assert np.isnan(got[1]).all() and not np.isnan(got[0]).any()


@pytest.mark.parametrize("k", [1500, 300], ids=["k_blocks", "one_k_block"])
@pytest.mark.parametrize("layout", [(False, False), (True, True)], ids=["mk_kn", "km_nk"])
def test_int64_output_is_the_exact_sums(isa, layout, k):
  """The int64 output (a split contraction's partial sums, added across devices before the
  one rounding) holds the exact sums, far past int32, over several K blocks and cache blocks,
  or over one K block, whose tiles the microkernel stores in place (edge tiles too: 70 rows,
  130 columns); the exponents are not read, the non-finite marker included."""
  rng = np.random.default_rng(8)
  (a, _, b, _), (a_in, _, b_in, _) = _operands(rng, 2, 70, k, 130, *layout)
  ea = np.full((2, 70), NONFINITE_EXPONENT, np.int32)
  with jax.enable_x64(True):
    got = np.asarray(_kernel(*layout, np.int64)(a_in, ea, b_in, np.zeros((1, 1), np.int32)))
  want = np.einsum("bmk,bkn->bmn", a.astype(np.int64), b.astype(np.int64))
  assert got.dtype == np.int64 and np.abs(want).max() > 2**33
  np.testing.assert_array_equal(got, want)


# Products whose packed operands reach 8 MB (gemm.c, GEMM_PACK_BYTES) with one exponent for b
# run as the 1x1 convolutions they are (run_as_convolution): a tall product of at most 256
# columns, a, the rows of x, m-major with an exponent per row; and a k-major product whose
# reduction is longer than its rows, a dense layer's weight gradient (x and dy, pixels-major,
# one exponent each). Odd K and edge panels on every side.
CONVOLUTION_PRODUCTS = {"mk_kn": ((16501, 255, 37), (False, False)),
                        "mk_nk": ((16501, 255, 37), (False, True)),
                        "km_kn": ((23, 180001, 19), (True, False))}


@pytest.mark.parametrize("name,out", [(name, out) for name in CONVOLUTION_PRODUCTS
                                      for out in ("f32", "bf16", "int64", "split")
                                      if not (out == "split" and name == "km_kn")])
def test_large_products_run_as_convolutions_with_the_same_bits(isa, name, out):
  """The kernel's large products give the reference's bits in every output format: rounded
  once to float32 or bfloat16, the exact int64 sums, and the two-part sums of a contraction
  split over 4 devices (for K = 255; the weight gradient's 180001 terms admit no split
  format)."""
  (m, k, n), layout = CONVOLUTION_PRODUCTS[name]
  rng = np.random.default_rng(m + k)
  ea = np.zeros((1, 1), np.int32) if layout[0] else rng.integers(-40, 0, (1, m)).astype(np.int32)
  (a, _, b, _), args = _operands(rng, 1, m, k, n, *layout, ea=ea)
  if out in ("f32", "bf16"):
    _assert_kernel_matches(args, *layout, jnp.float32 if out == "f32" else jnp.bfloat16)
    return
  s = np.einsum("bmk,bkn->bmn", a.astype(np.int64), b.astype(np.int64))
  a_in, _, b_in, eb = args
  if out == "int64":
    with jax.enable_x64(True):
      got = np.asarray(_kernel(*layout, np.int64)(a_in, ea, b_in, eb))
    assert np.abs(s).max() > 2**33
    np.testing.assert_array_equal(got, s)
    return
  split = partitioning.split_sums(k, 4)
  high, low = _split_kernel(split, *layout)(a_in, ea, b_in, eb)
  np.testing.assert_array_equal(_joined(high, low, split), s)


@pytest.mark.parametrize("layout", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["mk_kn", "km_kn", "mk_nk", "km_nk"])
def test_a_large_batch_runs_in_rounds_with_the_same_bits(isa, layout):
  """A batch whose packed operands pass 8 MB is packed and multiplied a few elements at a time
  (gemm.c, GEMM_PACK_BYTES; here rounds of 4 and 3 elements on every path's tiles), each
  element with its own exponents: per row of a and per column of b, per batch element."""
  rng = np.random.default_rng(7)
  batch, m, k, n = 7, 603, 1101, 301
  ea = rng.integers(-40, 0, (batch, m)).astype(np.int32)
  eb = rng.integers(-30, 0, (batch, n)).astype(np.int32)
  _, args = _operands(rng, batch, m, k, n, *layout, ea=ea, eb=eb)
  _assert_kernel_matches(args, *layout)


@pytest.mark.parametrize("shape", [(4101, 64, 528), (32797, 128, 64), (8203, 512, 256)],
                         ids=["gemm", "as_convolution", "as_convolution_through_row_strips"])
def test_outputs_past_the_caches_are_streamed_with_the_same_bits(isa, shape):
  """A float32 output of 8 MiB or more (macro.h, DFP_STREAM_OUTPUT_BYTES) is written with
  non-temporal stores where the path has them and its rows are 64-byte aligned, by the GEMM's
  loop (one K block, edge rows, and an edge panel on 32-column tiles) and by the convolution
  loop a large product runs as, its blocks of 256 columns through row strips on the AVX2 paths
  (macro.c, STRIP_MIN_COLS; an edge panel of 8203 rows stays direct): the same bits as the
  reference."""
  m, k, n = shape
  rng = np.random.default_rng(m)
  _, args = _operands(rng, 1, m, k, n, False, False)
  assert m * n * 4 >= 8 << 20 and n * 4 % 64 == 0
  _assert_kernel_matches(args, False, False)


@functools.cache
def _split_kernel(split, lhs_kmajor=False, rhs_nmajor=False):
  bind = registry.split_kernel(dfp_dot_general_p).bind
  return jax.jit(lambda *args: bind(*args, lhs_kmajor=lhs_kmajor, rhs_nmajor=rhs_nmajor, out_dtype=split))


def _joined(high, low, split):
  assert high.dtype == np.int32 and low.dtype == split.low_dtype
  assert (np.asarray(low) < 2**split.low_bits).all()
  return (np.asarray(high).astype(np.int64) << split.low_bits) + np.asarray(low).astype(np.int64)


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_split_sums_at_the_bound_of_their_format(isa, devices):
  """The two-part output (partitioning.split_sums) at the edge of each format: for K the
  largest reduction the uint8 format admits on ``devices`` devices, and the largest for
  uint16, sums of K products at both extremes (+-32767 * 32767 in every term) and random ones
  come back exact in their parts; the parts of ``devices`` such devices, added in their own
  types (int32, uint8 / uint16, wrapping as XLA's reduce-scatter would), rejoin to the exact
  total. One more term needs the next format (or int64)."""
  rng = np.random.default_rng(devices)
  for low_dtype in (np.uint8, np.uint16):
    fits = lambda t: (f := partitioning.split_sums(t, devices)) is not None and (
        f.low_dtype.itemsize <= np.dtype(low_dtype).itemsize)
    k = 1  # the largest reduction this format (or a narrower one) admits: fits is monotone
    for step in (2**p for p in range(16, -1, -1)):
      k += step if fits(k + step) else 0
    split = partitioning.split_sums(k, devices)
    assert split.low_dtype == low_dtype, (k, split)
    after = partitioning.split_sums(k + 1, devices)
    assert after is None or after.low_dtype.itemsize > split.low_dtype.itemsize, (k, split, after)
    a = rng.integers(-32767, 32768, (1, 6, k)).astype(np.int16)
    a[0, 0], a[0, 1] = 32767, -32767  # rows of the extremes
    b = np.full((1, k, 9), 32767, np.int16)
    b[0, :, 5:] = rng.integers(-32767, 32768, (k, 4))
    zero = np.zeros((1, 1), np.int32)
    high, low = _split_kernel(split)(a, zero, b, zero)
    s = np.einsum("bmk,bkn->bmn", a.astype(np.int64), b.astype(np.int64))
    assert s[0, 0, 0] == k * 32767**2 and s[0, 1, 0] == -k * 32767**2
    np.testing.assert_array_equal(_joined(high, low, split), s)
    # `devices` devices holding these extremes: the parts' sums stay in their types.
    for row in (0, 1):
      total_high = np.int32(0)
      total_low = split.low_dtype.type(0)
      with np.errstate(over="raise"):
        for _ in range(devices):
          total_high = np.int32(total_high + np.asarray(high)[0, row, 0])
          total_low = split.low_dtype.type(total_low + np.asarray(low)[0, row, 0])
      assert (int(total_high) << split.low_bits) + int(total_low) == devices * s[0, row, 0]


def test_split_sums_too_narrow_for_their_reduction_are_rejected(isa):
  """A kernel call whose sums' high parts could leave int32 fails (it would wrap): 32 terms
  reach 32 * 32767**2 < 2**31 * 2**4, not < 2**31 * 2**3; and low bits past their type."""
  a, b = np.ones((1, 2, 32), np.int16), np.ones((1, 32, 3), np.int16)
  zero = np.zeros((1, 1), np.int32)
  jax.block_until_ready(_split_kernel(cpu_ffi.SplitSums(4, np.dtype(np.uint8)))(a, zero, b, zero))
  for split in (cpu_ffi.SplitSums(3, np.dtype(np.uint8)), cpu_ffi.SplitSums(9, np.dtype(np.uint8))):
    with pytest.raises(Exception, match="split-sum low_bits"):
      jax.block_until_ready(_split_kernel(split)(a, zero, b, zero))


def _expected_scaled(s, k, out_dtype):
  """Spec section 3 for any integer exponent k: past +-1000 no float format and no int64 sum
  can escape Inf or 0 (the oracle would build 2**k exactly)."""
  if s == 0 or abs(k) <= 1000:
    return spec_oracle.encode(s, k, out_dtype)
  return math.copysign(math.inf if k > 0 else 0.0, s)


HUGE = [2**30, -2**30, 2**31 - 2, -2**31, 2**30 + 3, 5, -2**30 - 1]


@pytest.mark.parametrize("out_dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("per_column", [False, True], ids=["eb_scalar", "eb_per_column"])
def test_huge_exponent_sums_saturate_exactly(isa, out_dtype, per_column):
  """Hand-built exponents near +-2**31: their sum leaves int32, and the output is still the
  exact result: +-Inf above the range, +-0 below it, 0 for a zero sum, NaN for a non-finite
  operand, and finite where two huge exponents cancel."""
  rng = np.random.default_rng(6)
  (a, _, b, _), _ = _operands(rng, 1, len(HUGE) + 1, 24, 9, False, False, scale=300)
  a[0, 0] = 0  # a zero row: zero sums, whatever the scale
  ea = np.array([[2**31 - 2, *HUGE[:-1], NONFINITE_EXPONENT]], np.int32)
  eb = np.array([[-2**30 - 1 if per_column else 2**30 - 2, *HUGE, 2**30][:9 if per_column else 1]], np.int32)
  got = _assert_kernel_matches((a, ea, b, eb), False, False, out_dtype)
  s = a[0].astype(np.int64) @ b[0].astype(np.int64)
  want = np.array([[np.nan if NONFINITE_EXPONENT in (ea[0, i], eb[0, j % eb.shape[1]]) else
                    _expected_scaled(int(s[i, j]), int(ea[0, i]) + int(eb[0, j % eb.shape[1]]), out_dtype)
                    for j in range(s.shape[1])] for i in range(s.shape[0])], out_dtype)
  np.testing.assert_array_equal(_bits(got[0]), _bits(want))
  finite = np.isfinite(got[0, :-1])
  assert np.isinf(got).any() and (got[0, 1:-1] == 0).any() and (finite & (got[0, :-1] != 0)).any()
  assert (_bits(got[0, 0]) == 0).all() and np.isnan(got[0, -1]).all()


def test_minimum_int16_is_rejected(isa):
  a = np.full((1, 2, 4), -32768, np.int16)
  b = np.ones((1, 4, 2), np.int16)
  zero = np.zeros((1, 1), np.int32)
  with pytest.raises(Exception, match="-32768"):
    jax.block_until_ready(_kernel(False, False, np.float32)(a, zero, b, zero))


@pytest.mark.parametrize("operand", ["a", "b"])
@pytest.mark.parametrize("at", [(0, 0), (7, 21), (12, 39), (16, 33)], ids=lambda at: f"{at[0]}_{at[1]}")
def test_one_minimum_int16_anywhere_is_rejected(isa, operand, at):
  """A single -32768 among ordinary values: in the first or a later panel, in a whole 8-pair
  norm block or the short last one (K = 40: 20 pairs), in either operand."""
  rng = np.random.default_rng(3)
  a = rng.integers(-1000, 1001, (1, 17, 40)).astype(np.int16)
  b = rng.integers(-1000, 1001, (1, 40, 17)).astype(np.int16)
  row, k = at
  if operand == "a":
    a[0, row, k] = -32768
  else:
    b[0, k, row] = -32768
  zero = np.zeros((1, 1), np.int32)
  with pytest.raises(Exception, match="-32768"):
    jax.block_until_ready(_kernel(False, False, np.float32)(a, zero, b, zero))


def test_unsupported_or_unknown_isa_is_an_error(monkeypatch):
  missing = [name for name in cpu_ffi.ISAS if name not in cpu_ffi.supported_isas()]
  a = jnp.ones((1, 2, 4), jnp.int16)
  zero = jnp.zeros((1, 1), jnp.int32)
  b = jnp.ones((1, 4, 2), jnp.int16)
  for name, match in [(n, "cannot run") for n in missing] + [("sse9", "DFPJAX_ISA must be one of")]:
    monkeypatch.setenv("DFPJAX_ISA", name)
    with pytest.raises(Exception, match=match):
      jax.block_until_ready(_kernel(False, False, np.float32)(a, zero, b, zero))


def test_every_path_reports_consistently():
  assert cpu_ffi.supported_isas()[0] == "portable"
  assert cpu_ffi.best_isa() == cpu_ffi.supported_isas()[-1]


def test_the_kernel_is_built_for_an_ffi_api_the_installed_jaxlib_accepts():
  built, installed = cpu_ffi.kernel_ffi_api(), cpu_ffi.installed_ffi_api()
  assert installed is not None and built <= installed  # jaxlib ships the header it speaks
  assert built >= (0, 3)  # jax 0.10.2's, the oldest supported
  cpu_ffi.check_ffi_api(built, installed)


@pytest.mark.parametrize("built, installed, refused", [
    ((0, 3), (0, 2), True), ((1, 0), (0, 9), True), ((0, 3), (0, 3), False),
    ((0, 3), (0, 5), False), ((0, 5), None, False)])  # None: no header, XLA checks at the call
def test_a_kernel_built_for_a_newer_ffi_api_is_refused_by_name(built, installed, refused):
  if not refused:
    cpu_ffi.check_ffi_api(built, installed)
    return
  message = (rf"built against XLA FFI API {built[0]}\.{built[1]}, newer than the installed "
             rf"jaxlib .*'s {installed[0]}\.{installed[1]}, .*reinstall dfpjax")
  with pytest.raises(RuntimeError, match=message):
    cpu_ffi.check_ffi_api(built, installed)


def test_the_installed_ffi_api_is_read_from_the_header_jaxlib_ships(monkeypatch, tmp_path):
  header = tmp_path / "xla" / "ffi" / "api" / "c_api.h"
  monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(tmp_path))
  assert cpu_ffi.installed_ffi_api() is None
  header.parent.mkdir(parents=True)
  header.write_text("#define XLA_FFI_API_MAJOR 1  // comment\n#define XLA_FFI_API_MINOR 7\n")
  assert cpu_ffi.installed_ffi_api() is None  # a line the reader does not know: no guess
  header.write_text("// the API\n#define XLA_FFI_API_MAJOR 1\n\n#define XLA_FFI_API_MINOR 7\n")
  assert cpu_ffi.installed_ffi_api() == (1, 7)


def test_kernel_info_reports_the_paths_and_their_tiles():
  info = cpu_ffi.kernel_info()
  assert set(info) == {"supported_isas", "emulated_isas", "best_isa", "selected_isa", "microkernel",
                       "ffi_api"}
  assert info["ffi_api"] == "{}.{}".format(*cpu_ffi.kernel_ffi_api())
  assert info["supported_isas"] == cpu_ffi.supported_isas() and info["best_isa"] == cpu_ffi.best_isa()
  assert info["selected_isa"] == cpu_ffi.selected_isa()
  assert tuple(info["microkernel"]) == info["supported_isas"]
  tiles = {name: tuple(map(int, tile.split("x"))) for name, tile in info["microkernel"].items()}
  assert all(mr >= 1 and nr >= 1 for mr, nr in tiles.values())
  # Each tile is the kernel's: a product one row and one column longer than a tile still
  # equals the reference (edge panels), on the path that reports it.
  rng = np.random.default_rng(11)
  for name, (mr, nr) in tiles.items():
    with pytest.MonkeyPatch.context() as mp:
      mp.setenv("DFPJAX_ISA", name)
      assert cpu_ffi.kernel_info()["selected_isa"] == name
      _, args = _operands(rng, 1, mr + 1, 9, nr + 1, False, False)
      _assert_kernel_matches(args, False, False)


def test_a_bad_isa_variable_fails_when_the_first_op_is_lowered():
  """DFPJAX_ISA is checked where the targets are registered, naming the variable, the bad
  value and the valid ones (and checked again by the kernel when it runs)."""
  program = ("import jax.numpy as jnp, dfpjax\n"
             "dfpjax.dfp_dot_general(jnp.ones((2, 3)), jnp.ones((3, 2)), (((1,), (0,)), ((), ())))\n")
  env = {**os.environ, "DFPJAX_ISA": "avx9000"}
  run = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode != 0
  assert "ValueError: DFPJAX_ISA='avx9000' is not a kernel path" in run.stderr
  assert "portable, avx2, avx_vnni, avx512_vnni" in run.stderr


def test_conv_attributes_pad_to_three_dimensions_and_validate():
  kw = dict(batch=2, in_spatial=(9,), out_spatial=(4,), window=(3,), strides=(2,), padding_lo=(-1,),
            lhs_dilation=(1,), rhs_dilation=(2,), groups=3, in_channels=4, out_channels=5,
            mode="backward_data")
  got = cpu_ffi.conv_attributes(**kw)
  assert got["mode"] == "backward_data" and got["groups"] == 3 and got["groups"].dtype == np.int64
  for name, want in [("in_spatial", [1, 1, 9]), ("out_spatial", [1, 1, 4]), ("window", [1, 1, 3]),
                     ("strides", [1, 1, 2]), ("padding_lo", [0, 0, -1]), ("rhs_dilation", [1, 1, 2])]:
    assert got[name].dtype == np.int64 and got[name].tolist() == want, name
  for bad, match in [(dict(mode="transpose"), "mode 'transpose' must be one of"),
                     (dict(strides=(0,)), "strides .* must be >= 1"),
                     (dict(strides=(1, 2)), r"strides \(1, 2\) has 2 entries where window \(3,\) has 1"),
                     (dict(groups=0), "groups = 0 must be >= 1"),
                     (dict(in_spatial=(1, 1, 1, 9), out_spatial=(1, 1, 1, 4), window=(1, 1, 1, 3),
                           strides=(1,) * 4, padding_lo=(0,) * 4, lhs_dilation=(1,) * 4,
                           rhs_dilation=(1,) * 4), "more than 3 spatial dimensions")]:
    with pytest.raises(ValueError, match=match):
      cpu_ffi.conv_attributes(**{**kw, **bad})


def test_conv_weight_view_attributes_pad_and_the_handler_checks_the_taps():
  """A forward convolution's weight view (``weight_taps``, ``transposed_weights``,
  ``features_major_weights``) pads to the kernel's 3 dimensions like the geometry; the handler
  rejects taps outside b's window, a view in another mode, and sizes b by its own window."""
  kw = dict(batch=1, in_spatial=(5,), out_spatial=(3,), window=(3,), strides=(1,), padding_lo=(0,),
            lhs_dilation=(1,), rhs_dilation=(1,), groups=1, in_channels=2, out_channels=4, mode="forward")
  got = cpu_ffi.conv_attributes(**kw, weight_taps=[(5, 4, -2)], transposed_weights=True)
  assert got["weight_window"].tolist() == [1, 1, 5] and got["weight_tap_first"].tolist() == [0, 0, 4]
  assert got["weight_tap_step"].tolist() == [1, 1, -2] and got["transposed_weights"] == 1
  plain = cpu_ffi.conv_attributes(**kw)
  assert plain["weight_window"].tolist() == [1, 1, 3] and plain["weight_tap_step"].tolist() == [1, 1, 1]
  assert plain["features_major_weights"] == 0
  assert cpu_ffi.conv_attributes(**kw, features_major_weights=True)["features_major_weights"] == 1
  with pytest.raises(ValueError, match="weight_taps .* needs one"):
    cpu_ffi.conv_attributes(**kw, weight_taps=[(5, 4)])
  i16, i32 = lambda *s: jnp.ones(s, jnp.int16), lambda *s: jnp.zeros(s, jnp.int32)
  y = jax.ShapeDtypeStruct((1, 3, 4), jnp.float32)
  view = cpu_ffi.conv_attributes(**kw, weight_taps=[(5, 4, -2)], transposed_weights=True)
  _ffi(cpu_ffi.CONV_TARGET, y, i16(1, 5, 2), i32(1), i16(5, 4, 2), i32(1), **view)  # fits
  with pytest.raises(Exception, match="operand b has"):
    _ffi(cpu_ffi.CONV_TARGET, y, i16(1, 5, 2), i32(1), i16(3, 4, 2), i32(1), **view)
  for taps, mode in [((5, 4, -3), "forward"), ((5, 1, 2), "forward"), ((3, 2, -1), "backward_data")]:
    bad = cpu_ffi.conv_attributes(**{**kw, "mode": mode}, weight_taps=[taps])
    with pytest.raises(Exception, match="weight taps|only mode forward"):
      _ffi(cpu_ffi.CONV_TARGET, y, i16(1, 5, 2), i32(1), i16(taps[0], 2, 4), i32(1), **bad)
  for name in ("transposed_weights", "features_major_weights"):
    with pytest.raises(Exception, match=f"{name} holds 2, not 0 or 1"):
      _ffi(cpu_ffi.CONV_TARGET, y, i16(1, 5, 2), i32(1), i16(5, 4, 2), i32(1),
           **{**view, name: np.int64(2)})
  features_major = cpu_ffi.conv_attributes(**{**kw, "mode": "backward_weights"},
                                           features_major_weights=True)
  with pytest.raises(Exception, match="only mode forward"):  # backward_weights' b is dy
    _ffi(cpu_ffi.CONV_TARGET, jax.ShapeDtypeStruct((3, 2, 4), jnp.float32), i16(1, 5, 2), i32(1),
         i16(1, 3, 4), i32(1), **features_major)
  with pytest.raises(Exception, match="weight_window, weight_tap_first, weight_tap_step need 3 values"):
    _ffi(cpu_ffi.CONV_TARGET, y, i16(1, 5, 2), i32(1), i16(5, 4, 2), i32(1),
         **{**view, "weight_tap_step": np.asarray([1, -2], np.int64)})


def _ffi(target, out, *args, **attributes):
  cpu_ffi.register()
  if target in (cpu_ffi.DOT_GENERAL_TARGET, cpu_ffi.CONV_TARGET):  # the products' output attribute
    attributes = {**cpu_ffi.output_attributes(None), **attributes}
  return jax.block_until_ready(jax.jit(lambda *a: jax.ffi.ffi_call(target, out)(*a, **attributes))(*args))


def test_every_handler_checks_its_operand_sizes():
  """Operands that do not fit the attributes are an InvalidArgument naming the operand."""
  i16, i32 = lambda *s: jnp.ones(s, jnp.int16), lambda *s: jnp.zeros(s, jnp.int32)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  dot = dict(lhs_kmajor=np.int32(0), rhs_nmajor=np.int32(0))
  target = cpu_ffi.DOT_GENERAL_TARGET
  with pytest.raises(Exception, match="operand b is"):
    _ffi(target, f32(1, 2, 3), i16(1, 2, 4), i32(1, 1), i16(1, 5, 3), i32(1, 1), **dot)
  with pytest.raises(Exception, match="operand ea must be"):
    _ffi(target, f32(2, 2, 3), i16(2, 2, 4), i32(3, 1), i16(2, 4, 3), i32(1, 1), **dot)
  with pytest.raises(Exception, match="operand eb must be"):
    _ffi(target, f32(1, 2, 3), i16(1, 2, 4), i32(1, 1), i16(1, 4, 3), i32(1, 2), **dot)
  with pytest.raises(Exception, match="operand out has 4 elements"):
    _ffi(target, f32(1, 2, 2), i16(1, 2, 4), i32(1, 1), i16(1, 4, 3), i32(1, 1), **dot)
  split = dict(dot, low_bits=np.int32(2))
  parts = lambda high, low: (jax.ShapeDtypeStruct((1, 2, 3), high), jax.ShapeDtypeStruct((1, 2, 3), low))
  _ffi(target, parts(jnp.int32, jnp.uint8), i16(1, 2, 4), i32(1, 1), i16(1, 4, 3), i32(1, 1), **split)
  with pytest.raises(Exception, match="output must be f32, bf16, f16 or s64"):
    _ffi(target, jax.ShapeDtypeStruct((1, 2, 3), jnp.int32), i16(1, 2, 4), i32(1, 1), i16(1, 4, 3),
         i32(1, 1), **split)
  for high, low in ((jnp.int64, jnp.uint8), (jnp.int32, jnp.int8)):
    with pytest.raises(Exception, match="split sums take an s32 output and a u8 or u16 one"):
      _ffi(target, parts(high, low), i16(1, 2, 4), i32(1, 1), i16(1, 4, 3), i32(1, 1), **split)
  with pytest.raises(Exception, match="operand low has 5 elements"):
    _ffi(target, (parts(jnp.int32, jnp.uint8)[0], jax.ShapeDtypeStruct((5,), jnp.uint16)),
         i16(1, 2, 4), i32(1, 1), i16(1, 4, 3), i32(1, 1), **split)
  conv = cpu_ffi.conv_attributes(batch=1, in_spatial=(5,), out_spatial=(3,), window=(3,), strides=(1,),
                                 padding_lo=(0,), lhs_dilation=(1,), rhs_dilation=(1,), groups=1,
                                 in_channels=2, out_channels=4, mode="forward")
  target = cpu_ffi.CONV_TARGET
  _ffi(target, f32(1, 3, 4), i16(1, 5, 2), i32(1), i16(3, 2, 4), i32(1), **conv)  # fits
  for args, name in [((i16(1, 6, 2), i32(1), i16(3, 2, 4), i32(1)), "x"),
                     ((i16(1, 5, 2), i32(1), i16(3, 2, 5), i32(1)), "b"),
                     ((i16(1, 5, 2), i32(2), i16(3, 2, 4), i32(1)), "ex"),
                     ((i16(1, 5, 2), i32(1), i16(3, 2, 4), i32(2)), "eb")]:
    with pytest.raises(Exception, match=f"operand {name} has"):
      _ffi(target, f32(1, 3, 4), *args, **conv)
  with pytest.raises(Exception, match="operand out has"):
    _ffi(target, f32(1, 4, 4), i16(1, 5, 2), i32(1), i16(3, 2, 4), i32(1), **conv)
  with pytest.raises(Exception, match="mode 'sideways' is not one of"):
    _ffi(target, f32(1, 3, 4), i16(1, 5, 2), i32(1), i16(3, 2, 4), i32(1), **{**conv, "mode": "sideways"})
  quantize = (jax.ShapeDtypeStruct((2, 8), jnp.int16), jax.ShapeDtypeStruct((3,), jnp.int32))
  with pytest.raises(Exception, match="operand e has 3 elements"):
    _ffi(cpu_ffi.QUANTIZE_TARGET, quantize, jnp.ones((2, 8), jnp.float32), bits=np.int32(16),
         headroom=np.int32(0))
  given = dict(bits=np.int32(16), headroom=np.int32(0))
  with pytest.raises(Exception, match="operand group_max has 3 elements"):
    _ffi(cpu_ffi.QUANTIZE_GIVEN_MAX_TARGET, quantize[:1] + (jax.ShapeDtypeStruct((2,), jnp.int32),),
         jnp.ones((2, 8), jnp.float32), jnp.ones((3,), jnp.uint32), **given)
  with pytest.raises(Exception, match="operand top has 3 elements"):
    _ffi(cpu_ffi.MAX_MAGNITUDES_TARGET, jax.ShapeDtypeStruct((3,), jnp.uint32),
         jnp.ones((2, 8), jnp.float32))
  with pytest.raises(Exception, match="needs a leading groups dimension"):
    _ffi(cpu_ffi.MAX_MAGNITUDES_TARGET, jax.ShapeDtypeStruct((1,), jnp.uint32), jnp.ones((), jnp.float32))


def test_quantize_given_max_handler_rejects_a_signed_maximum():
  """group_max holds magnitudes: a float's raw bits with the sign set (which the kernel would
  read as a NaN maximum) are an error naming the group, not a zeroed group."""
  x = jnp.ones((2, 8), jnp.float32)
  out = (jax.ShapeDtypeStruct((2, 8), jnp.int16), jax.ShapeDtypeStruct((2,), jnp.int32))
  given = dict(bits=np.int32(16), headroom=np.int32(0))
  one = np.float32(1).view(np.uint32)
  m, e = _ffi(cpu_ffi.QUANTIZE_GIVEN_MAX_TARGET, out, x, jnp.asarray([one, one]), **given)
  assert (np.asarray(m) == 2**14).all() and (np.asarray(e) == -14).all()
  with pytest.raises(Exception, match=r"group_max\[1\] has the sign bit set"):
    _ffi(cpu_ffi.QUANTIZE_GIVEN_MAX_TARGET, out, x, jnp.asarray([one, np.float32(-1).view(np.uint32)]),
         **given)
