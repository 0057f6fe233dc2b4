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
// N must be a multiple of 16. Stripes are shared out among the calling thread and XLA's
// intra-op thread pool (claimed from an atomic counter, so the caller never waits on a stripe
// nobody has started).
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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 64;
constexpr int64_t kRowBlock = 4;  // activation rows whose accumulators share one pass over the weights
constexpr int64_t kDepth = 16;    // weight rows (inputs) widened into registers at a time

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

// The access pattern both kernels share: weights are read kDepth rows at a time across a whole
// column range, so each of those rows streams sequentially (a handful of hardware-prefetched
// streams, not one stream per row as a column-at-a-time loop would make).

// ---- int8: y[:, c0:c1] over all K inputs; y is the accumulator (zeroed here, scaled at the end)

void int8_columns(const float* x, int64_t M, int64_t K, const int8_t* q, int64_t N, const float* scale, float* y,
                  int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + c0, 0, sizeof(float) * (c1 - c0));
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, K - k0);
    for (int64_t c = c0; c < c1; c += 16) {
#ifdef PRESS_AVX512
      __m512 w[kDepth];
      for (int64_t i = 0; i < depth; ++i)
        w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k0 + i) * N + c))));
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k0;
        __m512 a = _mm512_loadu_ps(y + m * N + c);
        for (int64_t i = 0; i < depth; ++i) a = _mm512_fmadd_ps(_mm512_set1_ps(xm[i]), w[i], a);
        _mm512_storeu_ps(y + m * N + c, a);
      }
#else
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k0;
        float* ym = y + m * N + c;
        for (int64_t i = 0; i < depth; ++i) {
          const int8_t* row = q + (k0 + i) * N + c;
          for (int j = 0; j < 16; ++j) ym[j] += xm[i] * static_cast<float>(row[j]);
        }
      }
#endif
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = c0; c < c1; ++c) y[m * N + c] *= scale[c];
}

// ---- packed int4: y[:, c0:c1]; each group's J = S/2 byte rows accumulated in registers, then
// scaled into y (sums[m * G + g]: the group's sum of x, for the zero point's constant term)

void int4_columns(const float* x, int64_t M, int64_t K, const int8_t* q, int64_t N, int64_t S,
                  const uint16_t* scale, const uint16_t* offset, bool zero_point, const float* sums, float* y,
                  int64_t c0, int64_t c1) {
  const int64_t G = K / S, J = S / 2;
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + c0, 0, sizeof(float) * (c1 - c0));
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* codes = q + g * J * N;
    const float* xg = x + g * S;
    for (int64_t c = c0; c < c1; c += 16) {
#ifdef PRESS_AVX512
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + g * N + c)));
      __m512 constant = _mm512_setzero_ps();
      if (zero_point) {
        constant = _mm512_mul_ps(_mm512_set1_ps(8.0f), s);
        if (offset)
          constant = _mm512_add_ps(constant, _mm512_cvtph_ps(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset + g * N + c))));
      }
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, M - m0);
        __m512 acc[kRowBlock] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t j = 0; j < J; ++j) {
          const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j * N + c)));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));  // low nibble
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));                           // high nibble
          for (int64_t r = 0; r < rows; ++r) {
            const float* xm = xg + (m0 + r) * K;
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xm[J + j]), hi, _mm512_fmadd_ps(_mm512_set1_ps(xm[j]), lo, acc[r]));
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* ym = y + (m0 + r) * N + c;
          __m512 out = _mm512_fmadd_ps(s, acc[r], _mm512_loadu_ps(ym));
          if (zero_point) out = _mm512_fmadd_ps(_mm512_set1_ps(sums[(m0 + r) * G + g]), constant, out);
          _mm512_storeu_ps(ym, out);
        }
      }
#else
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xg + m * K;
        float acc[16] = {};
        for (int64_t j = 0; j < J; ++j) {
          const int8_t* row = codes + j * N + c;
          for (int i = 0; i < 16; ++i) {
            const int lo = static_cast<int8_t>(static_cast<uint8_t>(row[i]) << 4) >> 4, hi = row[i] >> 4;
            acc[i] += xm[j] * static_cast<float>(lo) + xm[J + j] * static_cast<float>(hi);
          }
        }
        for (int i = 0; i < 16; ++i) {
          const float sc = half_to_float(scale[g * N + c + i]);
          float out = sc * acc[i];
          if (zero_point) out += sums[m * G + g] * (8.0f * sc + (offset ? half_to_float(offset[g * N + c + i]) : 0.0f));
          y[m * N + c + i] += out;
        }
      }
#endif
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

int64_t thread_count(ffi::ThreadPool& pool, int64_t requested) {
  const int64_t available = pool.num_threads() + 1;  // the pool's threads and the caller
  return std::max<int64_t>(1, requested > 0 ? std::min(requested, available) : available);
}

ffi::Error check(int64_t M, int64_t N) {
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("press cpu kernels: rows must be in 1..64");
  if (N % 16) return ffi::Error::InvalidArgument("press cpu kernels: output width must be a multiple of 16");
  return ffi::Error::Success();
}

// Column ranges (multiples of 16) for `parts` workers.
inline int64_t range_start(int64_t part, int64_t parts, int64_t N) { return (N / 16 * part / parts) * 16; }

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
  const int64_t parts = std::min(thread_count(pool, threads), N / 16);
  parallel_stripes(pool, parts, parts, [=](int64_t part) {
    int8_columns(xp, M, K, qp, N, sp, yp, range_start(part, parts, N), range_start(part + 1, parts, N));
  });
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
  const int64_t parts = std::min(thread_count(pool, threads), N / 16);
  parallel_stripes(pool, parts, parts, [=](int64_t part) {
    int4_columns(xp, M, K, qp, N, S, sp, op, zero_point, sums_p, yp, range_start(part, parts, N),
                 range_start(part + 1, parts, N));
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
