// The thin XLA FFI binding: decodes buffers and attributes, runs the kernels on XLA's
// intra-op thread pool, turns kernel status codes into XLA errors.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "dfp_kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Work sharing on XLA's pool: helpers and the calling thread pull task indices from one
// counter, so the call finishes even if no helper ever gets a thread. The state is
// shared so that a helper starting late never touches a dead stack frame.
void PoolParallelFor(void* pool, size_t n, dfp_task_fn task, void* arg) {
  if (n == 0) return;
  auto* tp = static_cast<ffi::ThreadPool*>(pool);
  struct State {
    std::atomic<size_t> next{0}, done{0};
    size_t n;
    dfp_task_fn task;
    void* arg;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->task = task;
  state->arg = arg;
  auto work = [](State& s) {
    for (size_t i; (i = s.next.fetch_add(1)) < s.n;) {
      s.task(s.arg, i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(tp->num_threads(), static_cast<int64_t>(n)) - 1;
  for (int64_t h = 0; h < helpers; ++h) tp->Schedule([state, work] { work(*state); });
  work(*state);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error StatusToError(int status, dfp_isa isa) {
  switch (status) {
    case DFP_OK:
      return ffi::Error::Success();
    case DFP_ERR_ISA_UNSUPPORTED:
      return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                        std::string("dfpjax: DFPJAX_ISA=") + dfp_isa_name(isa) +
                            " forces a kernel path this CPU (or build) cannot run");
    case DFP_ERR_BAD_MANTISSA:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "dfpjax: a mantissa is -32768; DFP mantissas are symmetric, |m| <= 32767");
    case DFP_ERR_BAD_SHAPE:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dfpjax: invalid convolution geometry");
    default:
      return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dfpjax: out of memory in the DFP kernel");
  }
}

// The kernel path for this call (DFPJAX_ISA or the best), or an error.
ffi::ErrorOr<dfp_isa> SelectedIsa() {
  const int selected = dfp_selected_isa();
  if (selected < 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "dfpjax: DFPJAX_ISA must be one of portable, avx2, avx_vnni, avx512_vnni"));
  return static_cast<dfp_isa>(selected);
}

ffi::ErrorOr<dfp_out_format> OutFormat(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return DFP_OUT_F32;
    case ffi::DataType::BF16: return DFP_OUT_BF16;
    case ffi::DataType::F16: return DFP_OUT_F16;
    default: return ffi::Unexpected(ffi::Error::InvalidArgument("dfpjax: output must be f32, bf16 or f16"));
  }
}

ffi::Error DotGeneral(ffi::ThreadPool pool, ffi::Buffer<ffi::S16> a, ffi::Buffer<ffi::S32> ea,
                      ffi::Buffer<ffi::S16> b, ffi::Buffer<ffi::S32> eb,
                      ffi::Result<ffi::AnyBuffer> out, int32_t lhs_kmajor, int32_t rhs_nmajor) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  const auto format = OutFormat(out->element_type());
  if (format.has_error()) return format.error();
  const auto ad = a.dimensions(), bd = b.dimensions(), ead = ea.dimensions(), ebd = eb.dimensions();
  if (ad.size() != 3 || bd.size() != 3 || ead.size() != 2 || ebd.size() != 2)
    return ffi::Error::InvalidArgument("dfpjax: dot kernel expects rank-3 mantissas, rank-2 exponents");
  dfp_gemm_args args{};
  args.batch = ad[0];
  args.m = lhs_kmajor ? ad[2] : ad[1];
  args.k = lhs_kmajor ? ad[1] : ad[2];
  args.n = rhs_nmajor ? bd[1] : bd[2];
  args.a = a.typed_data();
  args.a_kmajor = lhs_kmajor;
  args.b = b.typed_data();
  args.b_nmajor = rhs_nmajor;
  args.ea = ea.typed_data();
  args.ea_batch_stride = ead[0] == 1 ? 0 : ead[1];
  args.ea_stride = ead[1] == 1 ? 0 : 1;
  args.eb = eb.typed_data();
  args.eb_batch_stride = ebd[0] == 1 ? 0 : ebd[1];
  args.eb_stride = ebd[1] == 1 ? 0 : 1;
  args.out = out->untyped_data();
  args.out_format = *format;
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  return StatusToError(dfp_gemm(&args, *isa, &par), *isa);
}

// geometry: batch, in[3], out[3], window[3], stride[3], pad_lo[3], lhs_dil[3], rhs_dil[3],
// groups, cin, cout (dfp_conv_shape, of the forward convolution). mode 0: y = conv(x, w);
// 1: dw from x and b = dy; 2: dx from x = dy and b = w.
ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::S16> x, ffi::Buffer<ffi::S32> ex,
                ffi::Buffer<ffi::S16> b, ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::AnyBuffer> out,
                ffi::Span<const int64_t> geometry, int32_t mode) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  const auto format = OutFormat(out->element_type());
  if (format.has_error()) return format.error();
  if (geometry.size() != 25) return ffi::Error::InvalidArgument("dfpjax: conv geometry needs 25 numbers");
  if (mode < 0 || mode > 2) return ffi::Error::InvalidArgument("dfpjax: conv mode must be 0, 1 or 2");
  for (size_t i = 0; i < geometry.size(); ++i)
    if (geometry[i] < 0 && !(i >= 13 && i < 16))  // only pad_lo may be negative
      return ffi::Error::InvalidArgument("dfpjax: negative size in the conv geometry");
  dfp_conv_shape s{};
  const int64_t* g = geometry.begin();
  s.batch = g[0];
  for (int d = 0; d < 3; ++d) {
    s.in[d] = g[1 + d];
    s.out[d] = g[4 + d];
    s.window[d] = g[7 + d];
    s.stride[d] = g[10 + d];
    s.pad_lo[d] = g[13 + d];
    s.lhs_dil[d] = g[16 + d];
    s.rhs_dil[d] = g[19 + d];
  }
  s.groups = g[22];
  s.cin = g[23];
  s.cout = g[24];
  const size_t in_pixels = s.batch * s.in[0] * s.in[1] * s.in[2];
  const size_t out_pixels = s.batch * s.out[0] * s.out[1] * s.out[2];
  const size_t taps = s.window[0] * s.window[1] * s.window[2];
  const size_t channels_out = s.groups * s.cout;
  const size_t x_size = (mode == 2 ? out_pixels * channels_out : in_pixels * s.groups * s.cin);
  const size_t b_size = mode == 1 ? out_pixels * channels_out : taps * s.cin * channels_out;
  const size_t out_size = mode == 0 ? out_pixels * channels_out
                          : mode == 1 ? taps * s.cin * channels_out : in_pixels * s.groups * s.cin;
  if (x.element_count() != x_size || b.element_count() != b_size ||
      out->element_count() != out_size || eb.element_count() != 1 ||
      (ex.element_count() != 1 && ex.element_count() != s.batch))
    return ffi::Error::InvalidArgument("dfpjax: conv operand sizes do not match the geometry");
  dfp_conv_args args{};
  args.shape = s;
  args.x = x.typed_data();
  args.ex = ex.typed_data();
  args.ex_batch_stride = ex.element_count() == 1 ? 0 : 1;
  args.b = b.typed_data();
  args.eb = eb.typed_data()[0];
  args.out = out->untyped_data();
  args.out_format = *format;
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  const int status = mode == 0   ? dfp_conv_forward(&args, *isa, &par)
                     : mode == 1 ? dfp_conv_backward_weights(&args, *isa, &par)
                                 : dfp_conv_backward_data(&args, *isa, &par);
  return StatusToError(status, *isa);
}

// x [groups, ...] float32 -> m (int16, shaped like x) and e [groups] (int32).
ffi::Error Quantize(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::S16>> m,
                    ffi::Result<ffi::Buffer<ffi::S32>> e, int32_t bits, int32_t headroom) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  const size_t groups = e->element_count();
  if (m->element_count() != x.element_count() || (groups && x.element_count() % groups))
    return ffi::Error::InvalidArgument("dfpjax: quantize operand sizes do not match");
  if (bits < 2 || bits > 16 || headroom < 0 || headroom > bits - 2)
    return ffi::Error::InvalidArgument("dfpjax: quantize needs 2 <= bits <= 16, 0 <= headroom <= bits - 2");
  dfp_quantize_args args{};
  args.groups = groups;
  args.n = groups ? x.element_count() / groups : 0;
  args.x = x.typed_data();
  args.bits = bits;
  args.headroom = headroom;
  args.m = m->typed_data();
  args.e = e->typed_data();
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  return StatusToError(dfp_quantize(&args, *isa, &par), *isa);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpQuantize, Quantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S16>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("headroom"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpDotGeneral, DotGeneral,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("lhs_kmajor")
                                  .Attr<int32_t>("rhs_nmajor"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpConv, Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("geometry")
                                  .Attr<int32_t>("mode"));
