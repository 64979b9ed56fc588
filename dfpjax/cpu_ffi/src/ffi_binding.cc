// The thin XLA FFI binding: decodes buffers and named attributes, checks every operand's size
// against them (an InvalidArgument naming the operand), runs the kernels on XLA's intra-op
// thread pool, turns each kernel status code into its own XLA error. The attribute names are
// the contract with dfpjax/cpu_ffi/__init__.py (conv_attributes).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
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
    case DFP_ERR_ALLOC:
      return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dfpjax: out of memory in the DFP kernel");
    case DFP_ERR_BAD_MANTISSA:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "dfpjax: a mantissa is -32768; DFP mantissas are symmetric, |m| <= 32767");
    case DFP_ERR_BAD_SHAPE:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "dfpjax: the DFP kernel rejected its geometry, quantization parameters or split-sum low_bits");
    default:
      return ffi::Error(ffi::ErrorCode::kInternal,
                        "dfpjax: the DFP kernel returned unknown status " + std::to_string(status));
  }
}

ffi::Error Invalid(const std::string& message) { return ffi::Error::InvalidArgument("dfpjax: " + message); }

// The kernel path for this call (DFPJAX_ISA or the best), or an error naming the bad value.
ffi::ErrorOr<dfp_isa> SelectedIsa() {
  const int selected = dfp_selected_isa();
  if (selected < 0) {
    const char* value = std::getenv("DFPJAX_ISA");
    return ffi::Unexpected(Invalid(std::string("DFPJAX_ISA='") + (value ? value : "") +
                                   "' is unknown; DFPJAX_ISA must be one of portable, avx2, avx_vnni, "
                                   "avx512_vnni"));
  }
  return static_cast<dfp_isa>(selected);
}

ffi::ErrorOr<dfp_out_format> OutFormat(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return DFP_OUT_F32;
    case ffi::DataType::BF16: return DFP_OUT_BF16;
    case ffi::DataType::F16: return DFP_OUT_F16;
    case ffi::DataType::S64: return DFP_OUT_S64;  // the exact sums, for a split contraction
    default: return ffi::Unexpected(Invalid("output must be f32, bf16, f16 or s64, or s32 with a second "
                                            "output, u8 or u16 (the sums split in two parts)"));
  }
}

// "" when operand `name` of `op` has the `expected` element count, else the complaint.
std::string CheckSize(const char* op, const char* name, size_t actual, size_t expected) {
  if (actual == expected) return "";
  return std::string(op) + ": operand " + name + " has " + std::to_string(actual) +
         " elements where its attributes need " + std::to_string(expected);
}

using OptionalResult = std::optional<ffi::Result<ffi::AnyBuffer>>;

// The kernel's output from the call's results: one (f32, bf16, f16 or s64), or two, the sums
// split into int32 high parts and u8 or u16 low parts of low_bits bits (dfp_out_format); each
// of `elements` elements.
ffi::ErrorOr<dfp_output> Output(const char* op, ffi::Result<ffi::AnyBuffer>& out, OptionalResult& low,
                                int32_t low_bits, size_t elements) {
  std::string bad = CheckSize(op, "out", out->element_count(), elements);
  if (!bad.empty()) return ffi::Unexpected(Invalid(bad));
  dfp_output o{};
  o.data = out->untyped_data();
  if (!low.has_value()) {
    const auto format = OutFormat(out->element_type());
    if (format.has_error()) return ffi::Unexpected(format.error());
    o.format = *format;
    return o;
  }
  const ffi::DataType low_type = (*low)->element_type();
  if (out->element_type() != ffi::DataType::S32 ||
      (low_type != ffi::DataType::U8 && low_type != ffi::DataType::U16))
    return ffi::Unexpected(Invalid(std::string(op) + ": split sums take an s32 output and a u8 or u16 one"));
  bad = CheckSize(op, "low", (*low)->element_count(), elements);
  if (!bad.empty()) return ffi::Unexpected(Invalid(bad));
  o.format = low_type == ffi::DataType::U8 ? DFP_OUT_SPLIT_U8 : DFP_OUT_SPLIT_U16;
  o.low = (*low)->untyped_data();
  o.low_bits = low_bits;
  return o;
}

ffi::Error DotGeneral(ffi::ThreadPool pool, ffi::Buffer<ffi::S16> a, ffi::Buffer<ffi::S32> ea,
                      ffi::Buffer<ffi::S16> b, ffi::Buffer<ffi::S32> eb,
                      ffi::Result<ffi::AnyBuffer> out, OptionalResult low, int32_t lhs_kmajor,
                      int32_t rhs_nmajor, int32_t low_bits) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  if ((lhs_kmajor != 0 && lhs_kmajor != 1) || (rhs_nmajor != 0 && rhs_nmajor != 1))
    return Invalid("dot_general: lhs_kmajor and rhs_nmajor must be 0 or 1");
  const auto ad = a.dimensions(), bd = b.dimensions(), ead = ea.dimensions(), ebd = eb.dimensions();
  if (ad.size() != 3 || bd.size() != 3 || ead.size() != 2 || ebd.size() != 2)
    return Invalid("dot_general: operands a and b must have rank 3, ea and eb rank 2");
  dfp_gemm_args args{};
  args.batch = ad[0];
  args.m = lhs_kmajor ? ad[2] : ad[1];
  args.k = lhs_kmajor ? ad[1] : ad[2];
  args.n = rhs_nmajor ? bd[1] : bd[2];
  const size_t b_k = rhs_nmajor ? bd[2] : bd[1];
  if (static_cast<size_t>(bd[0]) != args.batch || b_k != args.k)
    return Invalid("dot_general: operand b is [" + std::to_string(bd[0]) + ", " + std::to_string(bd[1]) +
                   ", " + std::to_string(bd[2]) + "], which does not fit a's batch " +
                   std::to_string(args.batch) + " and contraction " + std::to_string(args.k));
  auto fits = [](int64_t d, size_t full) { return d == 1 || static_cast<size_t>(d) == full; };
  if (!fits(ead[0], args.batch) || !fits(ead[1], args.m))
    return Invalid("dot_general: operand ea must be [1 or batch, 1 or M] = [1 or " +
                   std::to_string(args.batch) + ", 1 or " + std::to_string(args.m) + "]");
  if (!fits(ebd[0], args.batch) || !fits(ebd[1], args.n))
    return Invalid("dot_general: operand eb must be [1 or batch, 1 or N] = [1 or " +
                   std::to_string(args.batch) + ", 1 or " + std::to_string(args.n) + "]");
  const auto output = Output("dot_general", out, low, low_bits, args.batch * args.m * args.n);
  if (output.has_error()) return output.error();
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
  args.out = *output;
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  return StatusToError(dfp_gemm(&args, *isa, &par), *isa);
}

// The convolution's named attributes (dfpjax/cpu_ffi/__init__.py: conv_attributes) as a
// dfp_conv_shape, or the first attribute that is wrong.
struct ConvAttributes {
  int64_t batch;
  ffi::Span<const int64_t> in_spatial, out_spatial, window, strides, padding_lo, lhs_dilation, rhs_dilation;
  int64_t groups, in_channels, out_channels;
};

ffi::ErrorOr<dfp_conv_shape> ConvShape(const ConvAttributes& at) {
  struct Named {
    const char* name;
    ffi::Span<const int64_t> values;
    int64_t least;
  };
  const Named spans[] = {{"in_spatial", at.in_spatial, 0},     {"out_spatial", at.out_spatial, 0},
                         {"window", at.window, 0},             {"strides", at.strides, 1},
                         {"padding_lo", at.padding_lo, INT64_MIN}, {"lhs_dilation", at.lhs_dilation, 1},
                         {"rhs_dilation", at.rhs_dilation, 1}};
  for (const Named& span : spans) {
    if (span.values.size() != 3)
      return ffi::Unexpected(Invalid(std::string("conv: attribute ") + span.name + " needs 3 values"));
    for (int64_t v : span.values)
      if (v < span.least)
        return ffi::Unexpected(Invalid(std::string("conv: attribute ") + span.name + " holds " +
                                       std::to_string(v) + ", below its least value " +
                                       std::to_string(span.least)));
  }
  if (at.batch < 0 || at.groups < 1 || at.in_channels < 0 || at.out_channels < 0)
    return ffi::Unexpected(Invalid("conv: batch, in_channels, out_channels must be >= 0 and groups >= 1"));
  dfp_conv_shape s{};
  s.batch = at.batch;
  for (int d = 0; d < 3; ++d) {
    s.in[d] = at.in_spatial[d];
    s.out[d] = at.out_spatial[d];
    s.window[d] = at.window[d];
    s.stride[d] = at.strides[d];
    s.pad_lo[d] = at.padding_lo[d];
    s.lhs_dil[d] = at.lhs_dilation[d];
    s.rhs_dil[d] = at.rhs_dilation[d];
  }
  s.groups = at.groups;
  s.cin = at.in_channels;
  s.cout = at.out_channels;
  return s;
}

// The forward weights' view of b (dfp_weight_view), or the first attribute that is wrong: every
// tap of the window must land in b's window. Backward-data reads its weights plainly or
// features-major, backward-weights b (dy) plainly.
ffi::ErrorOr<dfp_weight_view> WeightView(const dfp_conv_shape& s, bool forward, bool data,
                                         ffi::Span<const int64_t> window, ffi::Span<const int64_t> first,
                                         ffi::Span<const int64_t> step, int64_t transposed, int64_t features_major) {
  if (window.size() != 3 || first.size() != 3 || step.size() != 3)
    return ffi::Unexpected(Invalid("conv: attributes weight_window, weight_tap_first, weight_tap_step need 3 values"));
  dfp_weight_view v{};
  v.transposed = transposed != 0;
  v.features_major = features_major != 0;
  bool taps_in_order = true;
  for (int d = 0; d < 3; ++d) {
    int64_t last = 0;
    const bool overflow = __builtin_mul_overflow(step[d], static_cast<int64_t>(s.window[d]) - 1, &last) ||
                          __builtin_add_overflow(last, first[d], &last);
    if (window[d] < 0 || (s.window[d] > 0 && (overflow || first[d] < 0 || first[d] >= window[d] || last < 0 ||
                                              last >= window[d])))
      return ffi::Unexpected(Invalid("conv: weight taps " + std::to_string(first[d]) + " + " + std::to_string(step[d]) +
                                     " * t for t < " + std::to_string(s.window[d]) + " leave weight_window " +
                                     std::to_string(window[d]) + " in dimension " + std::to_string(d)));
    v.window[d] = window[d];
    v.tap_first[d] = first[d];
    v.tap_step[d] = step[d];
    taps_in_order = taps_in_order && window[d] == static_cast<int64_t>(s.window[d]) && first[d] == 0 && step[d] == 1;
  }
  if (transposed != 0 && transposed != 1)
    return ffi::Unexpected(Invalid("conv: attribute transposed_weights holds " + std::to_string(transposed) +
                                   ", not 0 or 1"));
  if (features_major != 0 && features_major != 1)
    return ffi::Unexpected(Invalid("conv: attribute features_major_weights holds " + std::to_string(features_major) +
                                   ", not 0 or 1"));
  const bool plain = taps_in_order && transposed == 0 && features_major == 0;
  if (!forward && !(taps_in_order && transposed == 0 && (data || features_major == 0)))
    return ffi::Unexpected(Invalid("conv: only mode forward reads weights through a view (backward_data: "
                                   "features_major_weights alone)"));
  v.mapped = !plain;
  return v;
}

// Element count of an operand of 1 + 3 + 1 dimensions, or SIZE_MAX if it overflows.
size_t Elements(std::initializer_list<size_t> dims) {
  size_t total = 1;
  for (size_t d : dims)
    if (__builtin_mul_overflow(total, d, &total)) return SIZE_MAX;
  return total;
}

// mode "forward": y = conv(x, w), b holding w as the weight_* attributes say (dfp_weight_view);
// "backward_weights": dw from x and b = dy;
// "backward_data": dx from x = dy and b = w. The geometry is the forward convolution's.
ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::S16> x, ffi::Buffer<ffi::S32> ex,
                ffi::Buffer<ffi::S16> b, ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::AnyBuffer> out,
                OptionalResult low, int64_t batch, ffi::Span<const int64_t> in_spatial, ffi::Span<const int64_t> out_spatial,
                ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides,
                ffi::Span<const int64_t> padding_lo, ffi::Span<const int64_t> lhs_dilation,
                ffi::Span<const int64_t> rhs_dilation, int64_t groups, int64_t in_channels,
                int64_t out_channels, std::string_view mode, ffi::Span<const int64_t> weight_window,
                ffi::Span<const int64_t> weight_tap_first, ffi::Span<const int64_t> weight_tap_step,
                int64_t transposed_weights, int64_t features_major_weights, int32_t low_bits) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  const int forward = mode == "forward", weights = mode == "backward_weights", data = mode == "backward_data";
  if (!forward && !weights && !data)
    return Invalid("conv: mode '" + std::string(mode) +
                   "' is not one of forward, backward_weights, backward_data");
  const auto shape = ConvShape({batch, in_spatial, out_spatial, window, strides, padding_lo, lhs_dilation,
                                rhs_dilation, groups, in_channels, out_channels});
  if (shape.has_error()) return shape.error();
  const dfp_conv_shape& s = *shape;
  const auto view = WeightView(s, forward, data, weight_window, weight_tap_first, weight_tap_step, transposed_weights,
                               features_major_weights);
  if (view.has_error()) return view.error();
  const size_t input = Elements({s.batch, s.in[0], s.in[1], s.in[2], s.groups, s.cin});
  const size_t output = Elements({s.batch, s.out[0], s.out[1], s.out[2], s.groups, s.cout});
  const size_t weight = Elements({s.window[0], s.window[1], s.window[2], s.cin, s.groups, s.cout});
  const size_t weight_b = Elements({view->window[0], view->window[1], view->window[2], s.cin, s.groups, s.cout});
  const size_t ex_count = ex.element_count();
  std::string bad = CheckSize("conv", "x", x.element_count(), data ? output : input);
  if (bad.empty()) bad = CheckSize("conv", "b", b.element_count(), weights ? output : weight_b);
  if (bad.empty()) bad = CheckSize("conv", "eb", eb.element_count(), 1);
  if (bad.empty() && ex_count != 1 && (!forward || ex_count != s.batch))
    bad = "conv: operand ex has " + std::to_string(ex_count) + " elements where " + std::string(mode) +
          (forward ? " needs 1 or batch = " + std::to_string(s.batch) : " needs 1");
  if (!bad.empty()) return Invalid(bad);
  const auto result = Output("conv", out, low, low_bits, forward ? output : weights ? weight : input);
  if (result.has_error()) return result.error();
  dfp_conv_args args{};
  args.shape = s;
  args.weights = *view;
  args.x = x.typed_data();
  args.ex = ex.typed_data();
  args.ex_batch_stride = ex_count == 1 ? 0 : 1;
  args.b = b.typed_data();
  args.eb = eb.typed_data()[0];
  args.out = *result;
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  const int status = forward   ? dfp_conv_forward(&args, *isa, &par)
                     : weights ? dfp_conv_backward_weights(&args, *isa, &par)
                               : dfp_conv_backward_data(&args, *isa, &par);
  return StatusToError(status, *isa);
}

// x [groups, ...] float32 -> m (int16, shaped like x) and e [groups] (int32).
// Both quantize targets: group_max is null for dfpjax_quantize, which finds the maxima itself.
ffi::Error QuantizeGroups(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const uint32_t* group_max,
                          ffi::Result<ffi::Buffer<ffi::S16>>& m, ffi::Result<ffi::Buffer<ffi::S32>>& e,
                          int32_t bits, int32_t headroom) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  if (bits < 2 || bits > 16 || headroom < 0 || headroom > bits - 2)
    return Invalid("quantize: needs 2 <= bits <= 16, 0 <= headroom <= bits - 2");
  const auto xd = x.dimensions();
  if (xd.size() < 1) return Invalid("quantize: operand x needs a leading groups dimension");
  const size_t groups = xd[0];
  std::string bad = CheckSize("quantize", "m", m->element_count(), x.element_count());
  if (bad.empty()) bad = CheckSize("quantize", "e", e->element_count(), groups);
  if (!bad.empty()) return Invalid(bad);
  dfp_quantize_args args{};
  args.groups = groups;
  args.n = groups ? x.element_count() / groups : 0;
  args.x = x.typed_data();
  args.bits = bits;
  args.headroom = headroom;
  args.m = m->typed_data();
  args.e = e->typed_data();
  args.group_max = group_max;
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  return StatusToError(dfp_quantize(&args, *isa, &par), *isa);
}

ffi::Error Quantize(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::S16>> m,
                    ffi::Result<ffi::Buffer<ffi::S32>> e, int32_t bits, int32_t headroom) {
  return QuantizeGroups(pool, x, nullptr, m, e, bits, headroom);
}

ffi::Error QuantizeGivenMax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::U32> group_max, ffi::Result<ffi::Buffer<ffi::S16>> m,
                            ffi::Result<ffi::Buffer<ffi::S32>> e, int32_t bits, int32_t headroom) {
  const auto xd = x.dimensions();
  if (xd.size() >= 1) {
    const std::string bad = CheckSize("quantize", "group_max", group_max.element_count(), xd[0]);
    if (!bad.empty()) return Invalid(bad);
  }
  // A set sign bit would read as a NaN maximum and silently zero the group.
  const uint32_t* top = group_max.typed_data();
  for (size_t g = 0; g < group_max.element_count(); ++g)
    if (top[g] >> 31)
      return Invalid("quantize: group_max[" + std::to_string(g) + "] has the sign bit set; it takes magnitudes "
                     "(the float's bits & 0x7fffffff)");
  return QuantizeGroups(pool, x, group_max.typed_data(), m, e, bits, headroom);
}

// x [groups, ...] float32 -> each group's largest magnitude bit pattern (uint32 [groups]): the
// group_max of QuantizeGivenMax, for a shard whose groups' maxima are reduced across devices.
ffi::Error MaxMagnitudes(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::U32>> top) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  const auto xd = x.dimensions();
  if (xd.size() < 1) return Invalid("max_magnitudes: operand x needs a leading groups dimension");
  const size_t groups = xd[0];
  const std::string bad = CheckSize("max_magnitudes", "top", top->element_count(), groups);
  if (!bad.empty()) return Invalid(bad);
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  return StatusToError(dfp_max_magnitudes(x.typed_data(), groups, groups ? x.element_count() / groups : 0,
                                          top->typed_data(), *isa, &par),
                       *isa);
}

// a, b [groups, ..., channels] float32 and center [groups, channels] -> per group and channel
// sum(a) and sum(a * (b - center)) over the dimensions between (dfp_channel_sums).
ffi::Error ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> center, ffi::Result<ffi::Buffer<ffi::F32>> sum,
                       ffi::Result<ffi::Buffer<ffi::F32>> dot) {
  const auto isa = SelectedIsa();
  if (isa.has_error()) return isa.error();
  const auto ad = a.dimensions();
  if (ad.size() < 2) return Invalid("channel_sums: operand a needs leading groups and trailing channels dimensions");
  const size_t groups = ad[0], channels = ad[ad.size() - 1];
  std::string bad = CheckSize("channel_sums", "b", b.element_count(), a.element_count());
  if (bad.empty()) bad = CheckSize("channel_sums", "center", center.element_count(), groups * channels);
  if (bad.empty()) bad = CheckSize("channel_sums", "sum", sum->element_count(), groups * channels);
  if (bad.empty()) bad = CheckSize("channel_sums", "dot", dot->element_count(), groups * channels);
  if (!bad.empty()) return Invalid(bad);
  dfp_channel_sums_args args{};
  args.groups = groups;
  args.channels = channels;
  args.rows = groups * channels != 0 ? a.element_count() / (groups * channels) : 0;
  args.a = a.typed_data();
  args.b = b.typed_data();
  args.center = center.typed_data();
  args.sum = sum->typed_data();
  args.dot = dot->typed_data();
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  return StatusToError(dfp_channel_sums(&args, *isa, &par), *isa);
}

}  // namespace

// The handlers jax.ffi registers by name (dfpjax/cpu_ffi/__init__.py): exported (dfp_kernel.h's DFP_API).
extern "C" {
DFP_API XLA_FFI_Error* DfpQuantize(XLA_FFI_CallFrame* call_frame);
DFP_API XLA_FFI_Error* DfpQuantizeGivenMax(XLA_FFI_CallFrame* call_frame);
DFP_API XLA_FFI_Error* DfpDotGeneral(XLA_FFI_CallFrame* call_frame);
DFP_API XLA_FFI_Error* DfpConv(XLA_FFI_CallFrame* call_frame);
DFP_API XLA_FFI_Error* DfpMaxMagnitudes(XLA_FFI_CallFrame* call_frame);
DFP_API XLA_FFI_Error* DfpChannelSums(XLA_FFI_CallFrame* call_frame);
// The XLA FFI API version of the headers the handlers were built against: a jaxlib refuses
// handlers of a newer one, which dfpjax/cpu_ffi/__init__.py checks before registering them.
DFP_API void DfpFfiApiVersion(int32_t* major, int32_t* minor);
}

void DfpFfiApiVersion(int32_t* major, int32_t* minor) {
  *major = XLA_FFI_API_MAJOR;
  *minor = XLA_FFI_API_MINOR;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpQuantize, Quantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S16>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("headroom"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpQuantizeGivenMax, QuantizeGivenMax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
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
                                  .OptionalRet<ffi::AnyBuffer>()
                                  .Attr<int32_t>("lhs_kmajor")
                                  .Attr<int32_t>("rhs_nmajor")
                                  .Attr<int32_t>("low_bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpConv, Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .OptionalRet<ffi::AnyBuffer>()
                                  .Attr<int64_t>("batch")
                                  .Attr<ffi::Span<const int64_t>>("in_spatial")
                                  .Attr<ffi::Span<const int64_t>>("out_spatial")
                                  .Attr<ffi::Span<const int64_t>>("window")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding_lo")
                                  .Attr<ffi::Span<const int64_t>>("lhs_dilation")
                                  .Attr<ffi::Span<const int64_t>>("rhs_dilation")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("in_channels")
                                  .Attr<int64_t>("out_channels")
                                  .Attr<std::string_view>("mode")
                                  .Attr<ffi::Span<const int64_t>>("weight_window")
                                  .Attr<ffi::Span<const int64_t>>("weight_tap_first")
                                  .Attr<ffi::Span<const int64_t>>("weight_tap_step")
                                  .Attr<int64_t>("transposed_weights")
                                  .Attr<int64_t>("features_major_weights")
                                  .Attr<int32_t>("low_bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpMaxMagnitudes, MaxMagnitudes,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DfpChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
