// press CPU kernels: matmuls of a few rows of activations against stored int8 or packed int4
// weights that read every weight byte once and never write a float copy of the weights.
//
// XLA's CPU backend turns `x @ (q.astype(f32) * scale)` into a full conversion of q followed by a
// dot (or an elementwise loop), so a batch-1 decode step reads the int8 weights and writes and
// reads four times their bytes in float: slower than float weights. Here each 64-column stripe
// of the weights is streamed once; 16 integers at a time are widened to float in registers and
// multiplied into accumulators that stay in registers for the whole stripe.
//
// Layouts (row-major, as compress/quant stores them; see packed_int4.py), each weight array with a
// leading axis of L stacked layers of which the call reads layer `layer` (the layer scan hands
// the kernel the whole stack: a slice would be copied out of it first, compress/models/layer_scan.py):
//   x       f32  [M, K]            activations (M <= 64 rows)
//   int8:   q    s8   [L, K, N]    y[m, n] = scale[n] * sum_k x[m, k] q[k, n]
//           scale f32 [L, N]
//   int4:   q    s8   [L, G, S/2, N]  groups of S inputs; byte j of group g holds input g*S + j in its
//                                   low nibble and input g*S + S/2 + j in its high nibble (-8..7)
//           scale f16 [L, G, N], offset f16 [L, G, N] (zero point: codes are stored minus 8)
//           y[m, n] = sum_g scale[g, n] sum_{i in g} x[m, i] code[i, n]
//                   + [zero point] sum_g (8 scale[g, n] + offset[g, n]) sum_{i in g} x[m, i]
//   y       f32  [M, N]
// N must be a multiple of 16. Work is shared between the calling thread and XLA's intra-op thread
// pool (parts claimed from an atomic counter, so the caller never waits on a part nobody has
// started): a wide matrix (N >= 4096, the LM head) by ranges of columns, a narrow one by ranges of
// inputs, so that each worker streams one contiguous region of the weights; matrices under 256 KB
// stay on the caller (measured: handing half of a 110 KB matrix to a pool thread was slower).
// Measured on the development machine (2 Zen 4 cores, one projection of SmolLM2 from memory):
// 576 x 1536 int8 in 22 us (39 GB/s) where XLA's float32 dot of the same weights takes 55 us.
//
// Built by compress/quant/cpu_kernels.py with the machine's own compiler (-O3 -march=native);
// without AVX-512 the same loops are plain C++ for the compiler to vectorise.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PRESS_AVX512 1
#endif

#ifndef PRESS_PREFETCH
#define PRESS_PREFETCH 1024
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 64;
constexpr int64_t kRowBlock = 4;  // activation rows whose accumulators share one pass over the weights
#ifndef PRESS_DEPTH
#define PRESS_DEPTH 16
#endif
constexpr int64_t kDepth = PRESS_DEPTH;  // weight rows (inputs) widened into registers at a time
constexpr int64_t kPrefetch = PRESS_PREFETCH;  // bytes ahead along a wide weight row the next tiles are fetched
constexpr int64_t kWide = 4096;  // outputs from which workers split the columns; narrower, they split the inputs

// Where the next tiles' weights are, from a tile row: along the row for wide weights; for narrow
// ones (a worker owns whole rows, one contiguous region) the same columns of the next block of rows.
inline int64_t prefetch_ahead(int64_t N, int64_t rows_per_block) {
  return N >= kWide ? kPrefetch : rows_per_block * N;
}

inline float half_to_float(uint16_t h) {
#ifdef PRESS_AVX512
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      uint32_t m = man;
      do { m <<= 1; ++e; } while (!(m & 0x400));
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// The access pattern both kernels share: weights are read kDepth rows (int8) or one group's rows
// (int4) at a time, a tile of 64 columns (four vectors) of each, tile after tile across the
// column range: a handful of sequential streams the hardware prefetches, each row's cache line
// used whole, and four independent accumulator chains per activation row to hide FMA latency.
// Converted weights are reused by up to kRowBlock activation rows before the next are read.

#ifdef PRESS_AVX512
inline __m512 widen_int8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// Ask for rows [r0, r1), columns [c0, c1) of the weights now: a call's first block would otherwise
// wait on memory row by row before the in-loop prefetches (one block ahead) take over.
inline void prefetch_start(const int8_t* q, int64_t N, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
#ifdef PRESS_AVX512
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < c1; c += 64) _mm_prefetch(reinterpret_cast<const char*>(q + r * N + c), _MM_HINT_T0);
#endif
}

// ---- int8: y[m0 : m0 + R, c : c + 16 V] += x[m0 : m0 + R, k0 : k0 + depth] q[k0 : k0 + depth, c : ...]

template <int R, int V>
void int8_tile(const float* x, int64_t K, const int8_t* q, int64_t N, float* y, int64_t ldy, int64_t m0, int64_t k0,
               int64_t depth, int64_t c, int64_t ahead) {
#ifdef PRESS_AVX512
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_loadu_ps(y + (m0 + r) * ldy + c + 16 * v);
  const int8_t* row = q + k0 * N + c;
  for (int64_t i = 0; i < depth; ++i, row += N) {
    _mm_prefetch(reinterpret_cast<const char*>(row + ahead), _MM_HINT_T0);
    __m512 w[V];
    for (int v = 0; v < V; ++v) w[v] = widen_int8(row + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 xi = _mm512_set1_ps(x[(m0 + r) * K + k0 + i]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xi, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + (m0 + r) * ldy + c + 16 * v, acc[r][v]);
#else
  for (int r = 0; r < R; ++r) {
    float* ym = y + (m0 + r) * ldy + c;
    for (int64_t i = 0; i < depth; ++i) {
      const float xi = x[(m0 + r) * K + k0 + i];
      const int8_t* row = q + (k0 + i) * N + c;
      for (int j = 0; j < 16 * V; ++j) ym[j] += xi * static_cast<float>(row[j]);
    }
  }
#endif
}

// ---- int4: y[m0 : m0 + R, c : c + 16 V] += group g's contribution (sums[m * G + g]: the group's
// sum of x, for the zero point's constant term 8 scale + offset)

template <int R, int V>
void int4_tile(const float* x, int64_t K, const int8_t* q, int64_t N, int64_t S, const uint16_t* scale,
               const uint16_t* offset, bool zero_point, const float* sums, float* y, int64_t ldy, int64_t m0,
               int64_t g, int64_t c, int64_t ahead) {
  const int64_t G = K / S, J = S / 2;
  const float* xg = x + g * S;
#ifdef PRESS_AVX512
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const int8_t* row = q + g * J * N + c;
  for (int64_t j = 0; j < J; ++j, row += N) {
    _mm_prefetch(reinterpret_cast<const char*>(row + ahead), _MM_HINT_T0);
    __m512 lo[V], hi[V];
    for (int v = 0; v < V; ++v) {
      const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * v)));
      lo[v] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));  // sign-extended low nibble
      hi[v] = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));                           // the byte's high nibble
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xl = _mm512_set1_ps(xg[(m0 + r) * K + j]), xh = _mm512_set1_ps(xg[(m0 + r) * K + J + j]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xh, hi[v], _mm512_fmadd_ps(xl, lo[v], acc[r][v]));
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t at = g * N + c + 16 * v;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + at)));
    __m512 constant = _mm512_setzero_ps();
    if (zero_point) {
      constant = _mm512_mul_ps(_mm512_set1_ps(8.0f), s);
      if (offset)
        constant = _mm512_add_ps(constant, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset + at))));
    }
    for (int r = 0; r < R; ++r) {
      float* ym = y + (m0 + r) * ldy + c + 16 * v;
      __m512 out = _mm512_fmadd_ps(s, acc[r][v], _mm512_loadu_ps(ym));
      if (zero_point) out = _mm512_fmadd_ps(_mm512_set1_ps(sums[(m0 + r) * G + g]), constant, out);
      _mm512_storeu_ps(ym, out);
    }
  }
#else
  for (int r = 0; r < R; ++r) {
    const float* xm = xg + (m0 + r) * K;
    float acc[16 * V] = {};
    for (int64_t j = 0; j < J; ++j) {
      const int8_t* row = q + (g * J + j) * N + c;
      for (int i = 0; i < 16 * V; ++i) {
        const int lo = static_cast<int8_t>(static_cast<uint8_t>(row[i]) << 4) >> 4, hi = row[i] >> 4;
        acc[i] += xm[j] * static_cast<float>(lo) + xm[J + j] * static_cast<float>(hi);
      }
    }
    for (int i = 0; i < 16 * V; ++i) {
      const float sc = half_to_float(scale[g * N + c + i]);
      float out = sc * acc[i];
      if (zero_point) out += sums[(m0 + r) * G + g] * (8.0f * sc + (offset ? half_to_float(offset[g * N + c + i]) : 0.0f));
      y[(m0 + r) * ldy + c + i] += out;
    }
  }
#endif
}

#define PRESS_DISPATCH(FN, ROWS, VECS, ...)  \
  switch ((ROWS) * 8 + (VECS)) {             \
    case 1 * 8 + 1: FN<1, 1>(__VA_ARGS__); break; \
    case 1 * 8 + 2: FN<1, 2>(__VA_ARGS__); break; \
    case 1 * 8 + 3: FN<1, 3>(__VA_ARGS__); break; \
    case 1 * 8 + 4: FN<1, 4>(__VA_ARGS__); break; \
    case 2 * 8 + 1: FN<2, 1>(__VA_ARGS__); break; \
    case 2 * 8 + 2: FN<2, 2>(__VA_ARGS__); break; \
    case 2 * 8 + 3: FN<2, 3>(__VA_ARGS__); break; \
    case 2 * 8 + 4: FN<2, 4>(__VA_ARGS__); break; \
    case 3 * 8 + 1: FN<3, 1>(__VA_ARGS__); break; \
    case 3 * 8 + 2: FN<3, 2>(__VA_ARGS__); break; \
    case 3 * 8 + 3: FN<3, 3>(__VA_ARGS__); break; \
    case 3 * 8 + 4: FN<3, 4>(__VA_ARGS__); break; \
    case 4 * 8 + 1: FN<4, 1>(__VA_ARGS__); break; \
    case 4 * 8 + 2: FN<4, 2>(__VA_ARGS__); break; \
    case 4 * 8 + 3: FN<4, 3>(__VA_ARGS__); break; \
    case 4 * 8 + 4: FN<4, 4>(__VA_ARGS__); break; \
  }

constexpr int64_t kTile = 64;

// y[:, c0:c1] (row stride ldy) = the products over inputs [k0, k1) (zeroed first; not scaled)
void int8_part(const float* x, int64_t M, int64_t K, const int8_t* q, int64_t N, float* y, int64_t ldy,
               int64_t c0, int64_t c1, int64_t k0, int64_t k1) {
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * ldy + c0, 0, sizeof(float) * (c1 - c0));
  const int64_t ahead = prefetch_ahead(N, kDepth);
  prefetch_start(q, N, k0, std::min(k1, k0 + kDepth), c0, c1);  // the first block: the loop fetches the rest ahead
  for (int64_t k = k0; k < k1; k += kDepth) {
    const int64_t depth = std::min(kDepth, k1 - k);
    for (int64_t c = c0; c < c1; c += kTile) {
      const int64_t vecs = std::min(kTile, c1 - c) / 16;
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, M - m0);
        PRESS_DISPATCH(int8_tile, rows, vecs, x, K, q, N, y, ldy, m0, k, depth, c, ahead)
      }
    }
  }
}

// The same for packed int4 over groups [g0, g1), scales applied group by group
void int4_part(const float* x, int64_t M, int64_t K, const int8_t* q, int64_t N, int64_t S, const uint16_t* scale,
               const uint16_t* offset, bool zero_point, const float* sums, float* y, int64_t ldy, int64_t c0,
               int64_t c1, int64_t g0, int64_t g1) {
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * ldy + c0, 0, sizeof(float) * (c1 - c0));
  const int64_t ahead = prefetch_ahead(N, S / 2);
  if (g1 > g0) prefetch_start(q, N, g0 * (S / 2), (g0 + 1) * (S / 2), c0, c1);
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t c = c0; c < c1; c += kTile) {
      const int64_t vecs = std::min(kTile, c1 - c) / 16;
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, M - m0);
        PRESS_DISPATCH(int4_tile, rows, vecs, x, K, q, N, S, scale, offset, zero_point, sums, y, ldy, m0, g, c, ahead)
      }
    }
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Run stripe(s) for s in [0, stripes) on the caller and up to threads - 1 pool threads.
template <typename Stripe>
void parallel_stripes(ffi::ThreadPool& pool, int64_t stripes, int64_t threads, Stripe stripe) {
  auto shared = std::make_shared<Shared>();
  auto run = [shared, stripes, stripe]() {
    for (int64_t s; (s = shared->next.fetch_add(1)) < stripes;) {
      stripe(s);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(threads - 1, stripes - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run]() { run(); });
  run();
  while (shared->done.load(std::memory_order_acquire) < stripes) std::this_thread::yield();
}

#ifndef PRESS_MIN_SPLIT_BYTES
#define PRESS_MIN_SPLIT_BYTES (256 << 10)
#endif

// Workers for a matrix of `bytes`: one below PRESS_MIN_SPLIT_BYTES, where handing half of it to a
// pool thread costs more than streaming it (measured: a 110 KB matrix took longer on two threads).
int64_t thread_count(ffi::ThreadPool& pool, int64_t requested, int64_t bytes, int64_t rows) {
  if (bytes * std::max<int64_t>(1, rows / 4) < PRESS_MIN_SPLIT_BYTES) return 1;
  const int64_t available = pool.num_threads() + 1;  // the pool's threads and the caller
  return std::max<int64_t>(1, requested > 0 ? std::min(requested, available) : available);
}

ffi::Error check(int64_t M, int64_t N) {
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("press cpu kernels: rows must be in 1..64");
  if (N % 16) return ffi::Error::InvalidArgument("press cpu kernels: output width must be a multiple of 16");
  return ffi::Error::Success();
}

// Part `part` of `parts` of [0, n) in multiples of `unit`.
inline int64_t range_start(int64_t part, int64_t parts, int64_t n, int64_t unit) {
  return (n / unit * part / parts) * unit;
}

// Runs part(p, y_p, ldy) for p in [0, parts): a wide matrix's workers each own a range of columns
// of y; a narrow one's each own a range of inputs (`units` of them, whole rows of weights, so each
// worker streams one contiguous region), worker 0 into y and the others into scratch rows that are
// added to y at the end.
template <typename Part>
void split_work(ffi::ThreadPool& pool, int64_t threads, int64_t M, int64_t N, int64_t units, float* y, Part part) {
  const bool wide = N >= kWide;
  const int64_t parts = std::max<int64_t>(1, std::min(threads, wide ? N / 16 : units));
  if (wide || parts == 1) {
    parallel_stripes(pool, parts, parts, [=](int64_t p) {
      part(range_start(p, parts, N, 16), range_start(p + 1, parts, N, 16), 0, units, y, N);
    });
    return;
  }
  std::vector<float> scratch((parts - 1) * M * N);
  float* extra = scratch.data();
  parallel_stripes(pool, parts, parts, [=](int64_t p) {
    part(0, N, range_start(p, parts, units, 1), range_start(p + 1, parts, units, 1),
         p == 0 ? y : extra + (p - 1) * M * N, N);
  });
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t i = 0; i < M * N; ++i) y[i] += extra[(p - 1) * M * N + i];
}

// The layer a call reads, checked against the stack's depth.
ffi::Error layer_of(ffi::Buffer<ffi::S32>& layer, int64_t layers, int64_t* out) {
  *out = *layer.typed_data();
  if (*out < 0 || *out >= layers) return ffi::Error::InvalidArgument("press cpu kernels: layer out of range");
  return ffi::Error::Success();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y,
                      int64_t threads) {
  auto dims = q.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("press int8 kernel: weights must be [L, K, N]");
  const int64_t K = dims[1], N = dims[2], M = x.element_count() / K;
  if (auto error = check(M, N); error.failure()) return error;
  int64_t l;
  if (auto error = layer_of(layer, dims[0], &l); error.failure()) return error;
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data() + l * K * N;
  const float* sp = scale.typed_data() + l * N;
  float* yp = y->typed_data();
  // Inputs are split in whole blocks of kDepth rows.
  split_work(pool, thread_count(pool, threads, K * N, M), M, N, (K + kDepth - 1) / kDepth, yp,
             [=](int64_t c0, int64_t c1, int64_t b0, int64_t b1, float* out, int64_t ldy) {
               int8_part(xp, M, K, qp, N, out, ldy, c0, c1, b0 * kDepth, std::min(K, b1 * kDepth));
             });
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < N; ++c) yp[m * N + c] *= sp[c];
  return ffi::Error::Success();
}

ffi::Error Int4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> offset, ffi::Buffer<ffi::S32> layer,
                      ffi::ResultBuffer<ffi::F32> y, int64_t threads, bool zero_point, bool has_offset) {
  auto dims = q.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("press int4 kernel: codes must be [L, G, S/2, N]");
  const int64_t G = dims[1], S = 2 * dims[2], N = dims[3], K = G * S, M = x.element_count() / K;
  if (auto error = check(M, N); error.failure()) return error;
  int64_t l;
  if (auto error = layer_of(layer, dims[0], &l); error.failure()) return error;
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data() + l * G * (S / 2) * N;
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.typed_data()) + l * G * N;
  const uint16_t* op = has_offset ? reinterpret_cast<const uint16_t*>(offset.typed_data()) + l * G * N : nullptr;
  float* yp = y->typed_data();
  std::vector<float> sums(zero_point ? M * G : 0);
  for (int64_t m = 0; zero_point && m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float total = 0;
      for (int64_t i = 0; i < S; ++i) total += xp[m * K + g * S + i];
      sums[m * G + g] = total;
    }
  const float* sums_p = sums.data();
  split_work(pool, thread_count(pool, threads, K * N / 2, M), M, N, G, yp,
             [=](int64_t c0, int64_t c1, int64_t g0, int64_t g1, float* out, int64_t ldy) {
               int4_part(xp, M, K, qp, N, S, sp, op, zero_point, sums_p, out, ldy, c0, c1, g0, g1);
             });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_int8_matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_int4_matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("zero_point")
                                  .Attr<bool>("has_offset"));

// Which code path this build has (1: AVX-512, 0: plain C++), for the Python side to report.
extern "C" int press_cpu_kernels_avx512() {
#ifdef PRESS_AVX512
  return 1;
#else
  return 0;
#endif
}
