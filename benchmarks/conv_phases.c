/* Where the time of a DFP convolution pass goes, kernel call by kernel call, on the ResNet-50
 * layer set of benchmarks/conv.py: the quantization of each float operand (dfp_quantize) and
 * the three convolution kernels, each the minimum of --repeats runs on a pool of --threads
 * threads, next to the GEMM at 1024^3 (with its minor page faults per call, which the glibc
 * malloc settings the header names decide: print_malloc_settings), timed likewise before the
 * layers and after each one, so that the passes' shares of it at the end are taken against the
 * median of its minima over the same minutes (on a shared host one GEMM line may read 169 GOP/s
 * and the next, a minute later, 221: docs/performance.md). A pass's total is its kernel
 * plus the quantization of the operands it reads (forward: x, w; backward-data: dy, w;
 * backward-weights: x, dy), as benchmarks/conv.py times it; a last line gives the kernels'
 * share of the GEMM without the quantizations, and the most the passes could reach with the
 * kernels at the GEMM's rate and each quantization at its floor (stream_floats: the same bytes
 * read and written on the same threads, no arithmetic). The last column counts each
 * kernel's minor page faults per timed call (getrusage, all threads): the operands and outputs
 * are allocated once per layer, so these are the faults of the kernel's own scratch, unless
 * --fresh-outputs (below). Not built by CI;
 * build and run against an installed dfpjax:
 *
 *   KERNEL=$(python -c "import dfpjax.cpu_ffi._kernel as k; print(k.__file__)")
 *   gcc -O2 -Wall -Wextra -pthread -Idfpjax/cpu_ffi/src benchmarks/conv_phases.c "$KERNEL" \
 *       -Wl,--allow-shlib-undefined -o conv_phases
 *   ./conv_phases [--help] [--batch 32] [--threads 2] [--repeats 5] [--isa 3] [--no-gemm] [--fresh-outputs]
 *                 [--cpu-time | --balance] [--only fwd|data|weights] [--against LIBRARY] [layer ...]
 *
 * (--isa: 0 portable, 1 avx2, 2 avx_vnni, 3 avx512_vnni; --no-gemm skips the GEMM line, e.g.
 * under `perf record -e cpu-clock`, to profile the convolutions alone; --only times one pass's
 * kernel and skips the other two (printed as nan), to profile that kernel (the quantizations
 * and the data generation still run, under their own symbols); --fresh-outputs gives
 * each call a freshly allocated output, freed after it, as XLA does, so that the faults of
 * first writing it count too; --cpu-time times each call by the process's CPU time, user and
 * system, all threads, instead of the wall clock: steadier on a loaded machine, and best with
 * --threads 1, since the pool's waiting thread spins; --balance times each task by its thread's
 * CPU clock and reports, instead of a measured time, what the call would take on --threads idle
 * threads: its serial part (the calling thread outside parallel_for) plus, per parallel_for, the
 * makespan of its tasks dealt in order to the first free thread, as the pool does. A line
 * "split" per layer gives each pass's serial ms / tasks' CPU ms / that modelled ms: a modelled
 * time above (serial + tasks) / threads is imbalance, tasks' CPU above the one-thread run's is
 * the threads slowing each other. Load moves these less than wall times, but it does hide the
 * threads' contention for memory: they then seldom run at the same time.)
 *
 * --against LIBRARY compares two builds of the kernel in one process: LIBRARY (B, e.g. the
 * _kernel*.so of a build tree with a change) is loaded beside the linked one (A), and every
 * timed call runs in both, A then B and B then A in turn, so that the host's drift, which moves
 * one call's time by a half between runs of a minute apart on a shared VM, falls on both alike.
 * Each call's row gives both minima and the median over the rounds of B's time over A's in the
 * same round; the totals, each pass's sum of minima. Two copies of one build on Zen 3 (9 rounds,
 * the whole set): the kernels' medians 0.93-1.05, the quantizations' 0.90-1.12, the passes'
 * totals within 2%, where the minima of separate runs a minute apart differed by up to a
 * quarter: a change shows as a ratio past those on most layers, or in the totals. The warm-up
 * calls' outputs must agree bit for bit (a quantization's mantissas and exponent, a kernel's
 * float32): else it names the call and exits with status 1.
 */
#include <dlfcn.h>
#include <emmintrin.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "dfp_kernel.h"

/* --- a minimal persistent thread pool with the kernel's parallel_for contract --- */
typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  int threads, generation, stop;
  atomic_size_t next, done;
  size_t n;
  dfp_task_fn task;
  void* arg;
} pool_t;

/* --balance: each task's CPU time (its thread's clock), by parallel_for call of the timed kernel
 * call, and the calling thread's CPU time outside the calls (the serial part). */
enum { MAX_CALLS = 4096 };
static int balance;
static struct {
  size_t calls, tasks[MAX_CALLS];
  double* cost[MAX_CALLS];
  double in_calls; /* the calling thread's CPU seconds inside parallel_for, spinning included */
} trace;

static double thread_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void drain(pool_t* p) {
  double* cost = balance && trace.calls > 0 ? trace.cost[trace.calls - 1] : NULL;
  for (size_t i; (i = atomic_fetch_add(&p->next, 1)) < p->n;) {
    const double t0 = cost ? thread_seconds() : 0;
    p->task(p->arg, i);
    if (cost) cost[i] = thread_seconds() - t0;
    atomic_fetch_add(&p->done, 1);
  }
}

static void* worker(void* arg) {
  pool_t* p = (pool_t*)arg;
  int seen = 0;
  for (;;) {
    pthread_mutex_lock(&p->lock);
    while (p->generation == seen && !p->stop) pthread_cond_wait(&p->wake, &p->lock);
    seen = p->generation;
    const int stop = p->stop;
    pthread_mutex_unlock(&p->lock);
    if (stop) return NULL;
    drain(p);
  }
}

static void pool_for(void* pool, size_t n, dfp_task_fn task, void* arg) {
  pool_t* p = (pool_t*)pool;
  const double t0 = balance ? thread_seconds() : 0;
  if (balance) {
    if (trace.calls == MAX_CALLS) {
      fprintf(stderr, "--balance: more than %d parallel_for calls in one kernel call\n", MAX_CALLS);
      exit(1);
    }
    trace.tasks[trace.calls] = n;
    trace.cost[trace.calls++] = (double*)calloc(n ? n : 1, sizeof(double));
  }
  pthread_mutex_lock(&p->lock);
  p->n = n;
  p->task = task;
  p->arg = arg;
  atomic_store(&p->next, 0);
  atomic_store(&p->done, 0);
  ++p->generation;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->lock);
  drain(p);
  while (atomic_load(&p->done) < n) sched_yield();
  if (balance) trace.in_calls += thread_seconds() - t0;
}

/* The time of the traced kernel call on `threads` otherwise idle threads: its serial part plus,
 * per parallel_for call, the makespan of its tasks dealt in order to whichever thread is free
 * first (the pool's atomic counter). Also returns the tasks' CPU seconds in *work. */
static double modelled_seconds(int threads, double serial, double* work) {
  double total = serial, free_at[64];
  *work = 0;
  for (size_t c = 0; c < trace.calls; ++c) {
    for (int t = 0; t < threads; ++t) free_at[t] = 0;
    for (size_t i = 0; i < trace.tasks[c]; ++i) {
      int first = 0;
      for (int t = 1; t < threads; ++t)
        if (free_at[t] < free_at[first]) first = t;
      free_at[first] += trace.cost[c][i];
      *work += trace.cost[c][i];
    }
    double span = 0;
    for (int t = 0; t < threads; ++t)
      if (free_at[t] > span) span = free_at[t];
    total += span;
  }
  return total;
}

static void trace_reset(void) {
  for (size_t c = 0; c < trace.calls; ++c) free(trace.cost[c]);
  trace.calls = 0;
  trace.in_calls = 0;
}

/* --- data and timing --- */
static uint64_t rng = 88172645463325252ull;
/* Sum of 12 uniforms, centred: unit variance and, what the kernel's chunk bounds see, nearly a
 * Gaussian's ratio of largest to typical value (about 4.6 over a layer's operand), as in
 * benchmarks/conv.py. With 4 uniforms (at most 3.5 sigma) the quantized mantissas were so
 * evenly large that the bounds proved chunks of only 1-8 pairs, against 8-32 on Gaussian data. */
static float gauss(void) {
  float s = 0;
  for (int i = 0; i < 12; ++i) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    s += (float)(rng >> 40) / (float)(1 << 24);
  }
  return s - 6.0f;
}

/* A buffer as XLA:CPU allocates its operands and outputs: 64-byte aligned (the kernel streams
 * large outputs only into aligned rows, macro.h; glibc's malloc aligns a large block to 16). */
static void* xla_alloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

static float* floats(size_t n) {
  float* x = (float*)xla_alloc(n * sizeof(float));
  for (size_t i = 0; i < n; ++i) x[i] = gauss();
  return x;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

typedef int (*conv_fn)(const dfp_conv_args*, dfp_isa, const dfp_parallel*);
enum { QUANTIZE, CONV, GEMM, STREAM };
typedef struct {
  int kind;
  dfp_quantize_args q;
  conv_fn conv;
  dfp_conv_args c;
  dfp_gemm_args g;
  size_t out_bytes; /* the size of the output, for --fresh-outputs and --against's comparison */
  const char* name;
} call_t;

static int repeats = 5, fresh_outputs, cpu_time, only = -1; /* only: the one kernel timed (0 fwd, 1 data, 2 weights) */
static dfp_isa isa;
static dfp_parallel par;

/* --against: the other build's entries, and what the last best_ms measured of it. */
typedef int (*quantize_fn)(const dfp_quantize_args*, dfp_isa, const dfp_parallel*);
typedef int (*gemm_fn)(const dfp_gemm_args*, dfp_isa, const dfp_parallel*);
static struct {
  const char* path;
  conv_fn forward, backward_data, backward_weights;
  quantize_fn quantize;
  gemm_fn gemm;
} against;
static double last_against_ms, last_ratio; /* B's minimum, the median of B / A by round */

static long minor_faults(void) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

static double cpu_seconds(void) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

static double clock_seconds(void) { return cpu_time ? cpu_seconds() : now(); }

static long last_faults; /* minor page faults per timed call of the last best_ms */

/* --balance: the serial part and the tasks' CPU ms of the last best_ms's best call. */
static double last_serial_ms, last_work_ms;

/* The floor of a quantization on this machine: its floats read and as many INT16 written, with
 * the non-temporal stores the kernel gives outputs past the caches, in tasks of kStreamChunk
 * elements on the same pool, but no max and no rounding (SSE2, the x86-64 baseline; the loop
 * waits on memory, not on its arithmetic). */
enum { kStreamChunk = 1 << 16 };
static void stream_task(void* arg, size_t t) {
  const dfp_quantize_args* q = (const dfp_quantize_args*)arg;
  const size_t begin = t * kStreamChunk, end = begin + kStreamChunk < q->n ? begin + kStreamChunk : q->n;
  size_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m128i lo = _mm_cvttps_epi32(_mm_loadu_ps(q->x + i)), hi = _mm_cvttps_epi32(_mm_loadu_ps(q->x + i + 4));
    _mm_stream_si128((__m128i*)(q->m + i), _mm_packs_epi32(lo, hi));
  }
  for (; i < end; ++i) q->m[i] = (int16_t)q->x[i];
}

static void stream_floats(const dfp_quantize_args* q) {
  par.parallel_for(par.pool, (q->n + kStreamChunk - 1) / kStreamChunk, stream_task, (void*)q);
  _mm_sfence();
}

/* c run by build `lib`: 0 the linked one, 1 --against's. */
static int call(const call_t* c, int lib) {
  if (c->kind == STREAM) return stream_floats(&c->q), DFP_OK;
  if (c->kind == QUANTIZE) return (lib ? against.quantize : dfp_quantize)(&c->q, isa, &par);
  if (c->kind == GEMM) return (lib ? against.gemm : dfp_gemm)(&c->g, isa, &par);
  if (!lib) return c->conv(&c->c, isa, &par);
  const conv_fn f = c->conv == dfp_conv_forward         ? against.forward
                    : c->conv == dfp_conv_backward_data ? against.backward_data
                                                        : against.backward_weights;
  return f(&c->c, isa, &par);
}

static const char* current_layer; /* the layer (or the GEMM) being timed: --against names it where bits differ */

/* --against, the warm-up round: build A's output kept (lib 0), build B's compared with it (lib 1). */
static void check_bits(const call_t* c, int lib, unsigned char** kept, int32_t* kept_e) {
  const unsigned char* out = c->kind == QUANTIZE ? (const unsigned char*)c->q.m
                             : c->kind == CONV   ? (const unsigned char*)c->c.out.data
                                                 : (const unsigned char*)c->g.out.data;
  if (lib == 0) {
    *kept = (unsigned char*)malloc(c->out_bytes);
    memcpy(*kept, out, c->out_bytes);
    if (c->kind == QUANTIZE) *kept_e = *c->q.e;
    return;
  }
  size_t differ = 0;
  for (size_t i = 0; i < c->out_bytes; ++i) differ += (*kept)[i] != out[i];
  if (differ || (c->kind == QUANTIZE && *kept_e != *c->q.e)) {
    fprintf(stderr, "%s, %s: the builds' outputs differ (%zu of %zu bytes%s)\n", current_layer, c->name, differ,
            c->out_bytes, c->kind == QUANTIZE && *kept_e != *c->q.e ? ", and the exponent" : "");
    exit(1);
  }
  free(*kept);
}

static int compare_doubles(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

/* The minimum of --repeats timed runs of c after a warm-up; with --against, of each build's, in
 * rounds that run both (alternating which first), B's in last_against_ms, with the median of
 * B's time over A's by round in last_ratio. */
static double best_ms(const call_t* c) {
  const int builds = against.path ? 2 : 1;
  double best[2] = {1e30, 1e30}, *ratio = (double*)malloc((size_t)repeats * sizeof(double));
  long faults = 0;
  unsigned char* kept = NULL;
  int32_t kept_e = 0;
  for (int r = 0; r < repeats + 1; ++r) { /* the first round warms up */
    double t[2];
    for (int i = 0; i < builds; ++i) {
      const int lib = (r + i) % builds; /* the warm-up: A first */
      call_t run = *c;
      void* out = fresh_outputs && r > 0 ? xla_alloc(c->out_bytes) : NULL; /* the warm-up writes the real one */
      if (out) run.q.m = out, run.c.out.data = out, run.g.out.data = out;
      const long f0 = minor_faults();
      trace_reset();
      const double t0 = clock_seconds(), thread0 = thread_seconds();
      const int status = call(&run, lib);
      t[lib] = clock_seconds() - t0;
      double work = 0;
      const double serial = thread_seconds() - thread0 - trace.in_calls;
      if (balance) t[lib] = modelled_seconds(par.num_threads, serial, &work);
      free(out);
      if (status != DFP_OK) {
        fprintf(stderr, "kernel status %d%s\n", status, lib ? " (--against's build)" : "");
        exit(1);
      }
      if (r == 0 && builds == 2) check_bits(c, lib, &kept, &kept_e);
      if (r > 0 && t[lib] < best[lib]) {
        best[lib] = t[lib];
        if (lib == 0) last_serial_ms = serial * 1e3, last_work_ms = work * 1e3;
      }
      if (r > 0 && lib == 0) faults += minor_faults() - f0;
    }
    if (r > 0 && builds == 2) ratio[r - 1] = t[1] / t[0];
  }
  last_faults = faults / repeats;
  if (builds == 2) {
    qsort(ratio, (size_t)repeats, sizeof ratio[0], compare_doubles);
    last_against_ms = best[1] * 1e3;
    last_ratio = repeats % 2 ? ratio[repeats / 2] : (ratio[repeats / 2 - 1] + ratio[repeats / 2]) / 2;
  }
  free(ratio);
  return best[0] * 1e3;
}

static double quantize_ms(const char* name, const float* x, size_t n, int16_t* m, int32_t* e) {
  call_t c = {.kind = QUANTIZE, .q = {1, n, x, 16, 0, m, e}, .out_bytes = n * sizeof(int16_t), .name = name};
  return best_ms(&c);
}

/* best_ms of stream_floats over a quantization's operand and output; 0 with --against, which
 * compares builds, not the memory, and with --only, which prints no shares. */
static double floor_ms(const float* x, size_t n, int16_t* m) {
  if (against.path || only >= 0) return 0;
  call_t c = {.kind = STREAM, .q = {1, n, x, 16, 0, m, NULL}, .out_bytes = n * sizeof(int16_t), .name = "floor"};
  return best_ms(&c);
}

/* name: input size, input channels, window, stride, output channels (benchmarks/conv.py). */
static const struct {
  const char* name;
  int size, cin, window, stride, cout;
} kLayers[] = {
    {"conv1_7x7s2", 224, 3, 7, 2, 64},        {"conv2_1x1_reduce", 56, 256, 1, 1, 64},
    {"conv2_1x1", 56, 64, 1, 1, 64},          {"conv2_3x3", 56, 64, 3, 1, 64},
    {"conv2_1x1_expand", 56, 64, 1, 1, 256},  {"conv3_3x3", 28, 128, 3, 1, 128},
    {"conv3_1x1_expand", 28, 128, 1, 1, 512}, {"conv4_3x3", 14, 256, 3, 1, 256},
    {"conv4_1x1_expand", 14, 256, 1, 1, 1024}, {"conv5_3x3", 7, 512, 3, 1, 512},
    {"conv5_1x1_expand", 7, 512, 1, 1, 2048},
};

static dfp_conv_shape shape2d(size_t batch, size_t in, size_t out, size_t window, int64_t stride, int64_t pad,
                              size_t cin, size_t cout) {
  dfp_conv_shape s = {.batch = batch, .groups = 1, .cin = cin, .cout = cout};
  for (int d = 0; d < 3; ++d) {
    const int spatial = d > 0;
    s.in[d] = spatial ? in : 1;
    s.out[d] = spatial ? out : 1;
    s.window[d] = spatial ? window : 1;
    s.stride[d] = spatial ? stride : 1;
    s.pad_lo[d] = spatial ? pad : 0;
    s.lhs_dil[d] = s.rhs_dil[d] = 1;
  }
  return s;
}

/* The operands (0 x, 1 w, 2 dy) whose quantizations each pass includes: forward x and w,
 * backward-data dy and w, backward-weights x and dy. */
static const int kPassOperands[3][2] = {{0, 1}, {2, 1}, {0, 2}};

static double totals[3], total_gop, serial_totals[3], work_totals[3], against_totals[3];
static double quantize_totals[3], floor_totals[3]; /* each pass's quantizations, and their floor */

/* best_ms of a pass's kernel (0 forward, 1 backward-data, 2 backward-weights) and its faults per
 * call, or NaN where --only names another pass. */
static double kernel_ms(const call_t* c, int pass, long* faults) {
  if (only >= 0 && only != pass) {
    *faults = 0;
    last_serial_ms = last_work_ms = last_against_ms = last_ratio = NAN;
    return NAN;
  }
  const double ms = best_ms(c);
  *faults = last_faults;
  return ms;
}

static void run_layer(int l, size_t batch) {
  const size_t size = kLayers[l].size, cin = kLayers[l].cin, k = kLayers[l].window, cout = kLayers[l].cout;
  const int64_t stride = kLayers[l].stride, pad = (int64_t)(k - 1) / 2;
  const size_t out = (size + 2 * (size_t)pad - k) / (size_t)stride + 1;
  const size_t nx = batch * size * size * cin, nw = k * k * cin * cout, ny = batch * out * out * cout;
  float *x = floats(nx), *w = floats(nw), *dy = floats(ny);
  int16_t *mx = xla_alloc(nx * 2), *mw = xla_alloc(nw * 2), *mdy = xla_alloc(ny * 2);
  float* res = xla_alloc((nx > ny ? (nx > nw ? nx : nw) : (ny > nw ? ny : nw)) * sizeof(float));
  int32_t ex, ew, edy;
  /* Of Q(x), Q(w), Q(dy), fwd, data, weights: --balance's serial and tasks' ms, --against's B ms
   * and median ratio. */
  double split[6][2], versus[6][2];
#define SPLIT(i) \
  (split[i][0] = last_serial_ms, split[i][1] = last_work_ms, versus[i][0] = last_against_ms, versus[i][1] = last_ratio)
  current_layer = kLayers[l].name;
  const double qx = quantize_ms("Q(x)", x, nx, mx, &ex);
  SPLIT(0);
  const double qw = quantize_ms("Q(w)", w, nw, mw, &ew);
  SPLIT(1);
  const double qdy = quantize_ms("Q(dy)", dy, ny, mdy, &edy);
  SPLIT(2);
  const double floor_x = floor_ms(x, nx, mx), floor_w = floor_ms(w, nw, mw), floor_dy = floor_ms(dy, ny, mdy);
  const dfp_conv_shape s = shape2d(batch, size, out, k, stride, pad, cin, cout);
  call_t fwd = {.kind = CONV, .conv = dfp_conv_forward,
                .c = {.shape = s, .x = mx, .ex = &ex, .b = mw, .eb = ew, .out = {.data = res, .format = DFP_OUT_F32}},
                .out_bytes = ny * sizeof(float), .name = "fwd kernel"};
  call_t bwd_w = {.kind = CONV, .conv = dfp_conv_backward_weights,
                  .c = {.shape = s, .x = mx, .ex = &ex, .b = mdy, .eb = edy, .out = {.data = res, .format = DFP_OUT_F32}},
                  .out_bytes = nw * sizeof(float), .name = "bwd-weights kernel"};
  call_t bwd_d;
  if (cin < 16) { /* the primitive's col2im route */
    bwd_d = (call_t){.kind = CONV, .conv = dfp_conv_backward_data,
                     .c = {.shape = s, .x = mdy, .ex = &edy, .b = mw, .eb = ew, .out = {.data = res, .format = DFP_OUT_F32}}};
  } else { /* stride 1: a forward convolution of dy reading w flipped and transposed (the primitive's view) */
    const dfp_weight_view flipped = {.mapped = 1, .transposed = 1, .window = {1, k, k}, .tap_first = {0, k - 1, k - 1},
                                     .tap_step = {1, -1, -1}};
    bwd_d = (call_t){.kind = CONV, .conv = dfp_conv_forward,
                     .c = {.shape = shape2d(batch, out, size, k, 1, (int64_t)k - 1 - pad, cout, cin),
                           .weights = flipped, .x = mdy, .ex = &edy, .b = mw, .eb = ew, .out = {.data = res, .format = DFP_OUT_F32}}};
  }
  bwd_d.out_bytes = nx * sizeof(float);
  bwd_d.name = "bwd-data kernel";
  long ff, fd, fw;
  const double kf = kernel_ms(&fwd, 0, &ff);
  SPLIT(3);
  const double kd = kernel_ms(&bwd_d, 1, &fd);
  SPLIT(4);
  const double kw = kernel_ms(&bwd_w, 2, &fw);
  SPLIT(5);
#undef SPLIT
  const double gop = 2.0 * batch * out * out * cout * k * k * cin / 1e9;
  const double q[3] = {qx, qw, qdy}, floor_of[3] = {floor_x, floor_w, floor_dy}, kernel[3] = {kf, kd, kw};
  double quantizations[3], floors[3], pass[3];
  for (int i = 0; i < 3; ++i) {
    const int a = kPassOperands[i][0], b = kPassOperands[i][1];
    quantizations[i] = q[a] + q[b], floors[i] = floor_of[a] + floor_of[b], pass[i] = kernel[i] + quantizations[i];
  }
  if (against.path) {
    static const char* calls[6] = {"Q(x)", "Q(w)", "Q(dy)", "fwd kernel", "bwd-data kernel", "bwd-weights kernel"};
    const double ms[6] = {qx, qw, qdy, kf, kd, kw};
    for (int i = 0; i < 6; ++i)
      if (!isnan(ms[i]))
        printf("| %s | %s | %.2f | %.2f | %.3f | %.3f |\n", kLayers[l].name, calls[i], ms[i], versus[i][0],
               versus[i][0] / ms[i], versus[i][1]);
    for (int i = 0; i < 3; ++i)
      against_totals[i] += versus[3 + i][0] + versus[kPassOperands[i][0]][0] + versus[kPassOperands[i][1]][0];
  } else {
    printf("| %s | %.2f | %.2f / %.2f / %.2f | %.2f (%.0f) | %.2f (%.0f) | %.2f (%.0f) | %.0f / %.0f / %.0f |"
           " %ld / %ld / %ld |\n",
           kLayers[l].name, gop, qx, qw, qdy, kf, gop / kf * 1e3, kd, gop / kd * 1e3, kw, gop / kw * 1e3,
           gop / pass[0] * 1e3, gop / pass[1] * 1e3, gop / pass[2] * 1e3, ff, fd, fw);
  }
  if (balance) {
    printf("| %s split |", kLayers[l].name);
    for (int i = 0; i < 3; ++i) {
      const int parts[3] = {3 + i, kPassOperands[i][0], kPassOperands[i][1]}; /* kernel, quantizations */
      double serial = 0, work = 0;
      for (int j = 0; j < 3; ++j) serial += split[parts[j]][0], work += split[parts[j]][1];
      printf(" %.2f / %.2f / %.2f |", serial, work, pass[i]);
      serial_totals[i] += serial, work_totals[i] += work;
    }
    printf("\n");
  }
  fflush(stdout);
  for (int i = 0; i < 3; ++i) totals[i] += pass[i], quantize_totals[i] += quantizations[i], floor_totals[i] += floors[i];
  total_gop += gop;
  free(x), free(w), free(dy), free(mx), free(mw), free(mdy), free(res);
}

static double gemm_gops(size_t n) {
  int16_t* a = xla_alloc(n * n * 2);
  int16_t* b = xla_alloc(n * n * 2);
  float* c = xla_alloc(n * n * sizeof(float));
  for (size_t i = 0; i < n * n; ++i) a[i] = (int16_t)(gauss() * 4000), b[i] = (int16_t)(gauss() * 4000);
  int32_t e = 0;
  call_t g = {.kind = GEMM, .g = {1, n, n, n, a, 0, b, 0, &e, 0, 0, &e, 0, 0, {c, DFP_OUT_F32}},
              .out_bytes = n * n * sizeof(float), .name = "GEMM 1024^3"};
  current_layer = "before or after the layers";
  const double ms = best_ms(&g);
  free(a), free(b), free(c);
  return 2.0 * n * n * n / ms / 1e6;
}

/* The GEMM lines of the run, before the layers and after each one. */
enum { MAX_GEMMS = 64 };
static double gemm_lines[MAX_GEMMS];
static int gemm_count;

static double time_gemm(void) {
  const double gops = gemm_gops(1024);
  if (gemm_count < MAX_GEMMS) gemm_lines[gemm_count++] = gops;
  return gops;
}

/* The glibc malloc tunables in the environment, as benchmarks/common.py's malloc_settings: with
 * the defaults, a fresh process maps the GEMM's packed operands (4 MB at 1024^3) afresh on every
 * call and faults them in, about 1,000 faults and a sixth of its rate on Zen 3 (the GEMM line
 * counts them); a Python process running XLA has long raised glibc's mapping threshold past them. */
static void print_malloc_settings(void) {
  extern char** environ;
  int any = 0;
  for (char** e = environ; *e; ++e)
    if (!strncmp(*e, "MALLOC_", 7) || !strncmp(*e, "GLIBC_TUNABLES=", 15)) printf("%s%s", any++ ? " " : "", *e);
  printf("%s\n", any ? "" : "glibc malloc defaults");
}

static void usage(FILE* to) {
  fputs("usage: conv_phases [--help] [--batch N] [--threads N] [--repeats N] [--isa 0-3] [--no-gemm]\n"
        "                   [--fresh-outputs] [--cpu-time | --balance] [--only fwd|data|weights] [--against LIBRARY]\n"
        "                   [layer ...]\n"
        "  --isa: 0 portable, 1 avx2, 2 avx_vnni, 3 avx512_vnni (default: the best this CPU runs)\n"
        "  layers (default all):",
        to);
  for (size_t l = 0; l < sizeof kLayers / sizeof kLayers[0]; ++l) fprintf(to, " %s", kLayers[l].name);
  fputs("\n", to);
}

/* A command-line mistake: the message and the usage on stderr, exit status 2 (as argparse). */
__attribute__((format(printf, 1, 2), noreturn)) static void usage_error(const char* format, ...) {
  va_list args;
  va_start(args, format);
  fputs("conv_phases: error: ", stderr);
  vfprintf(stderr, format, args);
  va_end(args);
  fputs("\n", stderr);
  usage(stderr);
  exit(2);
}

/* The value after option argv[*i], which it steps past. */
static const char* option_value(int argc, char** argv, int* i) {
  if (*i + 1 >= argc) usage_error("%s: expected a value", argv[*i]);
  return argv[++*i];
}

/* An integer option's value, whole (strtol, not atoi's 0 for "abc") and in [low, high]. */
static int int_value(int argc, char** argv, int* i, int low, int high) {
  const char* option = argv[*i];
  const char* text = option_value(argc, argv, i);
  char* end;
  errno = 0;
  const long value = strtol(text, &end, 10);
  if (end == text || *end || errno || value < low || value > high)
    usage_error("%s: expected an integer from %d to %d, got '%s'", option, low, high, text);
  return (int)value;
}

int main(int argc, char** argv) {
  enum { LAYERS = sizeof kLayers / sizeof kLayers[0] };
  size_t batch = 32;
  int threads = 2, gemm = 1, chosen[LAYERS] = {0}, any_chosen = 0;
  isa = dfp_best_isa();
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    }
    if (!strcmp(argv[i], "--batch")) batch = (size_t)int_value(argc, argv, &i, 1, INT_MAX);
    else if (!strcmp(argv[i], "--threads")) threads = int_value(argc, argv, &i, 1, INT_MAX);
    else if (!strcmp(argv[i], "--repeats")) repeats = int_value(argc, argv, &i, 1, INT_MAX);
    else if (!strcmp(argv[i], "--isa")) {
      isa = (dfp_isa)int_value(argc, argv, &i, 0, DFP_ISA_COUNT - 1);
      if (!dfp_isa_supported(isa))
        usage_error("--isa %d: this CPU cannot run the %s path (or the library was built without it)", (int)isa,
                    dfp_isa_name(isa));
    }
    else if (!strcmp(argv[i], "--no-gemm")) gemm = 0;
    else if (!strcmp(argv[i], "--fresh-outputs")) fresh_outputs = 1;
    else if (!strcmp(argv[i], "--cpu-time")) cpu_time = 1;
    else if (!strcmp(argv[i], "--balance")) balance = 1;
    else if (!strcmp(argv[i], "--against")) against.path = option_value(argc, argv, &i);
    else if (!strcmp(argv[i], "--only")) {
      const char* pass = option_value(argc, argv, &i);
      only = !strcmp(pass, "fwd") ? 0 : !strcmp(pass, "data") ? 1 : !strcmp(pass, "weights") ? 2 : -2;
      if (only == -2) usage_error("--only: expected fwd, data or weights, got '%s'", pass);
    }
    else if (argv[i][0] == '-') usage_error("unknown option '%s'", argv[i]);
    else {
      int l = 0;
      while (l < LAYERS && strcmp(argv[i], kLayers[l].name)) ++l;
      if (l == LAYERS) usage_error("unknown layer '%s'", argv[i]);
      chosen[l] = any_chosen = 1;
    }
  }
  if (cpu_time && balance) usage_error("--cpu-time and --balance: one way of timing, not both");
  if (against.path) {
    if (balance) usage_error("--against: --balance models one build's tasks; run it without --against");
    /* Lazily bound: the library's Python module entry, which needs libpython, is never called.
     * Deep binding: B's own references to the functions it exports (the per-ISA entries its
     * configuration table names) bind to B's, not to the linked build's of the same name, which
     * would otherwise stand in for them unseen. */
    void* lib = dlopen(against.path, RTLD_LAZY | RTLD_LOCAL | RTLD_DEEPBIND);
    if (lib == NULL) {
      fprintf(stderr, "--against: %s\n", dlerror());
      return 2;
    }
    against.forward = (conv_fn)dlsym(lib, "dfp_conv_forward");
    against.backward_data = (conv_fn)dlsym(lib, "dfp_conv_backward_data");
    against.backward_weights = (conv_fn)dlsym(lib, "dfp_conv_backward_weights");
    against.quantize = (quantize_fn)dlsym(lib, "dfp_quantize");
    against.gemm = (gemm_fn)dlsym(lib, "dfp_gemm");
    if (!against.forward || !against.backward_data || !against.backward_weights || !against.quantize || !against.gemm) {
      fprintf(stderr, "--against: %s lacks a kernel entry (dfp_conv_*, dfp_quantize, dfp_gemm)\n", against.path);
      return 2;
    }
  }
  static pool_t pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};
  pool.threads = threads;
  for (int t = 1; t < threads; ++t) {
    pthread_t id;
    pthread_create(&id, NULL, worker, &pool);
  }
  par = (dfp_parallel){pool_for, &pool, threads};
  printf("# path %s, batch %zu, %d threads, min of %d%s; %s ms (GOP/s); ", dfp_isa_name(isa), batch, threads,
         repeats, fresh_outputs ? ", fresh outputs" : "", cpu_time ? "CPU" : "wall");
  print_malloc_settings();
  if (gemm) printf("# GEMM 1024^3: %.0f GOP/s, %ld minor faults per call\n", time_gemm(), last_faults);
  if (gemm && against.path)
    printf("# GEMM 1024^3 of --against's build: %.0f GOP/s, median of B / A by round %.3f\n",
           2.0 * 1024 * 1024 * 1024 / last_against_ms / 1e6, last_ratio);
  if (against.path)
    printf("# A: the linked build; B: %s\n| layer | call | A ms | B ms | B / A of the minima | median of B / A by round |\n"
           "|---|---|---|---|---|---|\n", against.path);
  else
    printf("| layer | GOP | Q(x) / Q(w) / Q(dy) ms | fwd kernel | bwd-data kernel | bwd-weights kernel |"
           " pass GOP/s fwd / data / weights | kernel faults per call fwd / data / weights |\n"
           "|---|---|---|---|---|---|---|---|\n");
  for (int l = 0; l < LAYERS; ++l) {
    if (any_chosen && !chosen[l]) continue;
    run_layer(l, batch);
    if (gemm) time_gemm(); /* reported with the others after the table */
  }
  double pass_gops[3];
  for (int p = 0; p < 3; ++p) pass_gops[p] = total_gop / totals[p] * 1e3;
  if (against.path) {
    static const char* passes[3] = {"forward", "backward-data", "backward-weights"};
    for (int p = 0; p < 3; ++p)
      printf("| total | %s pass | %.2f | %.2f | %.3f | |\n", passes[p], totals[p], against_totals[p],
             against_totals[p] / totals[p]);
  } else {
    printf("| total | %.1f | | | | | %.0f / %.0f / %.0f | |\n", total_gop, pass_gops[0], pass_gops[1], pass_gops[2]);
  }
  if (gemm_count > 0) {
    qsort(gemm_lines, (size_t)gemm_count, sizeof gemm_lines[0], compare_doubles);
    const double median = gemm_count % 2 ? gemm_lines[gemm_count / 2]
                                         : (gemm_lines[gemm_count / 2 - 1] + gemm_lines[gemm_count / 2]) / 2;
    printf("# the passes against the median of %d GEMM lines, before the layers and after each (%.0f GOP/s; "
           "%.0f-%.0f): %.0f%% / %.0f%% / %.0f%%\n",
           gemm_count, median, gemm_lines[0], gemm_lines[gemm_count - 1], 100 * pass_gops[0] / median,
           100 * pass_gops[1] / median, 100 * pass_gops[2] / median);
    if (!against.path && only < 0) {
      /* What bounds those shares: the kernels' own, and the most the passes could reach with the
       * kernels at the GEMM's rate and the quantizations at their floor. */
      const double at_gemm_ms = total_gop / median * 1e3;
      double kernels[3], ceiling[3];
      for (int p = 0; p < 3; ++p) {
        kernels[p] = 100 * at_gemm_ms / (totals[p] - quantize_totals[p]);
        ceiling[p] = 100 * at_gemm_ms / (at_gemm_ms + floor_totals[p]);
      }
      printf("# the kernels alone: %.0f%% / %.0f%% / %.0f%% of that GEMM; the passes' quantizations %.1f / %.1f / %.1f ms, "
             "their floor (the floats read, as many INT16 streamed out, no arithmetic: stream_floats) %.1f / %.1f / %.1f ms; "
             "with the kernels at the GEMM's rate and the quantizations at that floor the passes would reach "
             "%.0f%% / %.0f%% / %.0f%%\n",
             kernels[0], kernels[1], kernels[2], quantize_totals[0], quantize_totals[1], quantize_totals[2],
             floor_totals[0], floor_totals[1], floor_totals[2], ceiling[0], ceiling[1], ceiling[2]);
    }
  }
  if (balance)
    printf("| total split | %.1f / %.1f / %.1f | %.1f / %.1f / %.1f | %.1f / %.1f / %.1f |\n", serial_totals[0],
           work_totals[0], totals[0], serial_totals[1], work_totals[1], totals[1], serial_totals[2], work_totals[2],
           totals[2]);
  return 0;
}
