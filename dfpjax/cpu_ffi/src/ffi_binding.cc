// The thin XLA FFI binding: decodes buffers and attributes, runs dfp_gemm on XLA's
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
    default:
      return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dfpjax: out of memory in the DFP kernel");
  }
}

ffi::Error DotGeneral(ffi::ThreadPool pool, ffi::Buffer<ffi::S16> a, ffi::Buffer<ffi::S32> ea,
                      ffi::Buffer<ffi::S16> b, ffi::Buffer<ffi::S32> eb,
                      ffi::Result<ffi::AnyBuffer> out, int32_t lhs_kmajor, int32_t rhs_nmajor) {
  const int selected = dfp_selected_isa();
  if (selected < 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "dfpjax: DFPJAX_ISA must be one of portable, avx2, avx_vnni, avx512_vnni");
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
  switch (out->element_type()) {
    case ffi::DataType::F32: args.out_format = DFP_OUT_F32; break;
    case ffi::DataType::BF16: args.out_format = DFP_OUT_BF16; break;
    case ffi::DataType::F16: args.out_format = DFP_OUT_F16; break;
    default: return ffi::Error::InvalidArgument("dfpjax: output must be f32, bf16 or f16");
  }
  dfp_parallel par{PoolParallelFor, &pool, static_cast<int>(pool.num_threads())};
  const dfp_isa isa = static_cast<dfp_isa>(selected);
  return StatusToError(dfp_gemm(&args, isa, &par), isa);
}

}  // namespace

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
