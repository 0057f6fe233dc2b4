// press CPU kernels: matmuls of a few rows of activations against stored int8, packed int4 or
// float32 weights that read every weight byte once and never write a float copy of the weights, and
// attention over the KV cache in place.
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
//   f32:    w    f32  [L, K, N]    y[m, n] = sum_k x[m, k] w[k, n]  (a float model's decode steps:
//                                  XLA's dot of a few rows against one layer of a stack ran at a
//                                  quarter of the read rate; the same loops as int8, no widening)
//   bf16:   w    bf16 [L, K, N]    the same with bfloat16 weights (a model loaded with
//                                  param_dtype=bfloat16): half the bytes, each weight widened to
//                                  float32 in registers (exact), products and sums in float32
//   int4:   q    s8   [L, G, S/2, N]  groups of S inputs; byte j of group g holds input g*S + j in its
//                                   low nibble and input g*S + S/2 + j in its high nibble (-8..7)
//           scale f16 [L, G, N], offset f16 [L, G, N] (zero point: codes are stored minus 8)
//           y[m, n] = sum_g scale[g, n] sum_{i in g} x[m, i] code[i, n]
//                   + [zero point] sum_g (8 scale[g, n] + offset[g, n]) sum_{i in g} x[m, i]
//   y       f32  [M, N]
//   tiled   (the `tiled` attribute of the f32, bf16, int8 and int4 calls) the same arrays with each
//           16-row block of a narrow matrix (int4: each group's S/2 byte rows) stored as its 64-column
//           tiles one after another, so the loops read it in order (kTileRows below).
//   w4a8    (press_w4a8_matmul, AVX-512 or AVX2) int4's arrays, its tiles reordered for 4-byte integer
//           dot products, and x rounded to int8 per group of S inputs: integer products per group
// N must be a multiple of 16. Work is shared between the calling thread and the kernels' own
// spinning workers (below; parts claimed from an atomic counter, so the caller never waits on a
// part nobody has started): a wide matrix (N >= 4096, the LM head) by ranges of columns, a narrow
// one by ranges of inputs, so that each worker streams one contiguous region of the weights;
// matrices under 64 KB stay on the caller.
// Measured on the development machine (2 Zen 4 cores, one projection of SmolLM2 from memory):
// 576 x 1536 int8 in 22 us (39 GB/s) where XLA's float32 dot of the same weights takes 55 us.
//
// Decode attention (press_attention_f32 / _s8, below): a few query positions per cache row against
// the layer's keys and values read where they lie in the KV cache; see the section's comment.
//
// Built by compress/kernels/cpu.py with the machine's own compiler (-O3 -march=native): AVX-512
// where the CPU has it, else AVX2 with FMA and F16C (the matmuls, attention, argmax and w4a8; w8a8
// needs AVX-512 VNNI), else the same loops in plain C++ for the compiler to vectorise (no w4a8).

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <pthread.h>
#include <sched.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PRESS_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// AVX2 with FMA and F16C (Intel since Haswell, AMD since Zen 1): the same loops on 8-float vectors,
// in passes whose accumulators fit its 16 registers. Portable C++ here ran the int8 projections at
// 9-14 GB/s on one row and under 2 GB/s on eight (2 Zen 2 cores), the int4 ones at 3 GB/s.
#include <immintrin.h>
#define PRESS_AVX2 1
#endif

#ifndef PRESS_PREFETCH
#define PRESS_PREFETCH 2048
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
// A wide matrix (the LM head, rows of 49152 bytes) takes fewer rows at a time: each is one stream
// the hardware follows, and 16 of them, crossing a 4 KB page every 64 tiles, ran at 17 GB/s on
// one core where 4 ran at 28 (the read roof: 26).
constexpr int64_t kWideDepth = 4;
constexpr int64_t kPrefetch = PRESS_PREFETCH;  // bytes ahead along a wide weight row the next tiles are fetched
constexpr int64_t kWide = 4096;  // outputs from which workers split the columns; narrower, they split the inputs
// The tiled layout of float weights (compress/quant/matmul.py native_float): a narrow matrix [K, N]
// stored as [K / 16, N / 64, 16, 64], so that each tile the loops read (16 input rows of 64
// columns, kDepth x kTile) is one contiguous 4 KB (float32) run and a block of rows a sequence of
// them. Rows of N read 64 columns at a time are 16 streams a stride of N apart; one thread read
// SmolLM2's projections that way at 13-19 GB/s and tiled at 21-25 (a scratch harness, 1 row).
// Measured (SmolLM2's projections, 2 Zen 4 cores): the engine's fp32 decode step took 0.64-0.91x the
// time tiled at 1-5 rows, but 1.04-1.09x at 8-24, where blocks of 4 rows run over each tile in turn;
// one call on one thread (benchmarks/kernel_calls.py) 0.69-0.88x at 1 and 4 rows, 1.10-1.26x at 8.
// Not understood: prefetching from the first block of rows only, nearer (2-8 tiles on) or not at all
// were all slower at 8 rows. So the engine tiles only where its steps carry at most 5 rows
// (serve/engine.py TILED_ROWS).
constexpr int64_t kTileRows = 16, kTileCols = 64;

// Where the next tiles' weights are, from a tile row: along the row for wide weights; for narrow
// ones (a worker owns whole rows, one contiguous region) the same columns of the next block of rows.
inline int64_t prefetch_ahead(int64_t N, int64_t rows_per_block) {
  return N >= kWide ? kPrefetch : rows_per_block * N;
}

// The next call's weights (the layer's next projection, when the model says which:
// compress/models/layer_scan.py): a narrow part's last block prefetches, instead of the block
// after it, the first bytes this part's share of them, so memory stays busy across the gap
// between calls, where both threads finish and XLA's small ops run before the next call.
struct NextWeights {
  const int8_t* begin = nullptr;
  int64_t bytes = 0;
  // The prefetch offset for a block starting at `block` of part p of `parts`: from its rows to
  // the same places in this part's share of the next weights (or, without them, `ahead`).
  int64_t offset(const int8_t* block, int64_t ahead, int64_t p, int64_t parts) const {
    if (!begin) return ahead;
    return static_cast<int64_t>(reinterpret_cast<intptr_t>(begin + bytes * p / parts) -
                                reinterpret_cast<intptr_t>(block));
  }
};

// A bfloat16 weight: the top half of a float32, so widening is a 16-bit shift (exact).
struct Bf16 {
  uint16_t bits;
  explicit operator float() const {
    const uint32_t wide = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  }
};
static_assert(sizeof(Bf16) == 2, "bf16 weights are read in place");

// ---- the vector instructions, one struct per instruction set: the loops below are written once
// against `Simd` (16 float lanes in 32 registers on AVX-512, 8 in 16 on AVX2) and their sizes
// (vectors a pass over the weights takes, heads an attention pass holds) come from it.

#if defined(PRESS_AVX512) || defined(PRESS_AVX2)
#define PRESS_SIMD 1
#endif

#ifdef PRESS_AVX512
struct Simd {
  using F = __m512;
  using Mask = uint32_t;  // one bit a lane
  static constexpr int kLanes = 16, kRegisters = 32;
  // Weight vectors one pass over a tile's rows takes for R activation rows: R * P accumulators,
  // R broadcasts and the weight vectors within 32 registers, so the whole 64-column tile.
  template <int R> static constexpr int kPass = 4;
  // Narrow passes, where a tile's weights meet block after block of 4 rows (weight_part says
  // when): 16 columns a pass, not 64, ran int8 weights at 5-64 rows in 0.74-0.89x the time and
  // float32 ones at 16-17 rows in 0.71-0.88x, but float32 at 5-8 rows in 1.0-1.2x
  // (benchmarks/kernel_calls.py --libraries, one thread, Zen 4); fewer than 4 rows keep their chains.
  // On Zen 5, which has two 512-bit FMA pipes where Zen 4 has one, 4 rows x 1 vector are too few
  // chains to fill them: int8 weights in passes of 2 vectors ran at 5-64 rows in 0.71-0.88x the
  // time of 1, float32 at 8-24 rows in 0.99-1.10x (so it keeps 1).
  template <typename W, int R> static constexpr int kNarrowPass = R < 4 ? 4 : sizeof(W) == 1 ? 2 : 1;
  // Passes where a call's rows are one block alone (weight_tiles): as elsewhere.
  template <int R> static constexpr int kSolePass = kPass<R>;
  // int4: the same, with two nibble vectors and the table; 16 columns a pass at 4 rows ran 0.81-0.90x
  // the time of 64 at 4-64 rows (benchmarks/kernel_calls.py --libraries, one thread, Zen 4), and on
  // Zen 5 32 columns ran 0.76-0.83x the time of 16.
  template <int R> static constexpr int kPass4 = R >= 4 ? 2 : 4;
  // Attention: a key's vectors held in registers beside GB * HC accumulators (at most 16).
  static constexpr bool kHoldKeys = true;
  static constexpr int heads_per_pass(int hc) { return hc <= 4 ? 4 : hc <= 6 ? 2 : 1; }

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const int8_t* p) {  // 16 int8 widened to float
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load(const Bf16* p) {  // 16 bfloat16 widened to float (shifted into the top half)
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static F load_aligned(const float* p) { return _mm512_load_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_aligned(float* p, F v) { _mm512_store_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static float max_lane(F v) { return _mm512_reduce_max_ps(v); }
  static Mask nan_lanes(F v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
  static Mask equal_lanes(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static F zero_where_minus_inf(F scores, F v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(scores, set1(-INFINITY), _CMP_NEQ_OQ), v);
  }
  static F round(F t) { return _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F scale_by_pow2(F p, F n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
  // The lanes' int4 weights: p's 16 bytes, each byte's low and high nibble as a float; vpermps
  // reads a lane's low 4 bits, so one table lookup converts a nibble.
  static void nibbles(const int8_t* p, F& lo, F& hi) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(b, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  }
  // Integer vectors (w4a8): 16 int32 lanes, each holding four bytes of one column.
  using I = __m512i;
  template <int R> static constexpr int kPassI = 4;  // vectors a pass over a w4a8 tile: all 64 columns
  static I load_i(const int8_t* p) { return _mm512_loadu_si512(p); }
  static I bytes(char v) { return _mm512_set1_epi8(v); }
  static I words(int32_t v) { return _mm512_set1_epi32(v); }
  static I izero() { return _mm512_setzero_si512(); }
  static I bit_xor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I bit_and(I a, I b) { return _mm512_and_si512(a, b); }
  static I shift_right4(I a) { return _mm512_srli_epi16(a, 4); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static int32_t isum(I a) { return _mm512_reduce_add_epi32(a); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static I to_int(F a) { return _mm512_cvtps_epi32(a); }  // the default rounding: to nearest, ties to even
  static F abs(F a) { return _mm512_abs_ps(a); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static void store_codes(int8_t* p, I codes) {  // 16 int32 in -127..127 as bytes
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(codes));
  }
  // acc + in each lane the four unsigned bytes of u times the four signed bytes of s: vpdpbusd,
  // else (AVX-512 without VNNI) vpmaddubsw and vpmaddwd, exact while no pair of products
  // exceeds int16 (w4a8: u <= 15, |s| <= 127).
  static I dot4(I acc, I u, I s) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
  }
#ifdef __AVX512VNNI__
  // acc + in each lane the four signed bytes of w times the four signed bytes of x, plus
  // kSignedBias times the sum of x's four (w8a8-gN): vpdpbusd on w with its top bit flipped (w + 128).
  static constexpr int32_t kSignedBias = 128;
  static I dot4s(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, _mm512_xor_si512(w, bytes(static_cast<char>(0x80))), x); }
#endif
};
#elif defined(PRESS_AVX2)
struct Simd {
  using F = __m256;
  using Mask = uint32_t;
  static constexpr int kLanes = 8, kRegisters = 16;
  // 16 registers: fewer vectors a pass as the rows grow (R * P accumulators and R broadcasts).
  template <int R> static constexpr int kPass = R == 1 ? 8 : R <= 3 ? 4 : 2;
  // Narrow passes: already 16 columns at 4 rows; 8 ran slower.
  template <typename W, int R> static constexpr int kNarrowPass = kPass<R>;
  // A call whose rows are one block alone (a batch-1 speculative check of K + 1 <= 4 tokens, a
  // step of 2-4 rows): at 4 rows 3 vectors a pass (12 accumulators, 4 broadcasts, the weights
  // read as the FMAs' memory operands), at 2 rows 6. Float32 weights at 4 rows took 0.78-0.82x
  // the time of 2 vectors tiled (0.92-0.95x untiled), at 2 rows 0.85-0.88x the time of 4 tiled
  // (0.81-0.94x untiled); bfloat16 0.87-1.02x; int8 (its own passes) the same
  // (benchmarks/kernel_calls.py --libraries, one thread, Zen 2). In larger calls, whose blocks of 4
  // rows meet each tile in turn, 3 vectors ran 1.16-1.25x slower at 8 and 16 rows: kPass there.
  template <int R> static constexpr int kSolePass = R == 4 ? 3 : R == 2 ? 6 : kPass<R>;
  // int4: 2 R broadcasts and two nibble vectors beside the accumulators; at 4 rows 2 vectors a pass
  // (16 columns, as AVX-512's) ran 0.71-0.79x the time of 1, though they spill a register or two.
  template <int R> static constexpr int kPass4 = R <= 2 ? 4 : 2;
  // Attention: keys and values read at each use (HC of them would not fit beside the accumulators).
  static constexpr bool kHoldKeys = false;
  static constexpr int heads_per_pass(int hc) { return hc <= 2 ? 4 : hc <= 4 ? 2 : 1; }

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load(const Bf16* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static F load_aligned(const float* p) { return _mm256_load_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_aligned(float* p, F v) { _mm256_store_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float max_lane(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static Mask nan_lanes(F v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
  static Mask equal_lanes(F a, F b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
  static F zero_where_minus_inf(F scores, F v) {
    return _mm256_and_ps(_mm256_cmp_ps(scores, set1(-INFINITY), _CMP_NEQ_OQ), v);
  }
  static F round(F t) { return _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n with 2^n built in the exponent bits (n >= -126 after exp_nonpositive's clamp, so a
  // normal float).
  static F scale_by_pow2(F p, F n) {
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(
                                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
  }
  // Each of p's 8 bytes sign-extended to a lane: its low nibble by a shift pair, its high one by
  // an arithmetic shift.
  static void nibbles(const int8_t* p, F& lo, F& hi) {
    const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
    hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
  }
  // Integer vectors (w4a8): 8 int32 lanes, each holding four bytes of one column. A w4a8 pass
  // keeps R x P accumulators, two broadcasts a row and the nibbles within 16 registers.
  using I = __m256i;
  template <int R> static constexpr int kPassI = R == 1 ? 8 : R == 2 ? 4 : 2;
  static I load_i(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I bytes(char v) { return _mm256_set1_epi8(v); }
  static I words(int32_t v) { return _mm256_set1_epi32(v); }
  static I izero() { return _mm256_setzero_si256(); }
  static I bit_xor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I bit_and(I a, I b) { return _mm256_and_si256(a, b); }
  static I shift_right4(I a) { return _mm256_srli_epi16(a, 4); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static int32_t isum(I a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static I to_int(F a) { return _mm256_cvtps_epi32(a); }  // the default rounding: to nearest, ties to even
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static void store_codes(int8_t* p, I codes) {  // 8 int32 in -127..127 as bytes (the packs saturate nothing)
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
  }
  // acc + in each lane the four unsigned bytes of u times the four signed bytes of s (vpdpbusd's
  // sum) by vpmaddubsw and vpmaddwd, as llama.cpp's AVX2 Q4 x Q8 products: exact while no pair of
  // products exceeds int16 (w4a8: u <= 15, |s| <= 127, a pair at most 3810).
  static I dot4(I acc, I u, I s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  // acc + in each lane the four signed bytes of w times the four signed bytes of x (w8a8-gN): |x|
  // times w with x's sign, as llama.cpp's AVX2 Q8 x Q8 products; exact for codes in -127..127 (a
  // pair at most 32,258 in size).
  static constexpr int32_t kSignedBias = 0;
  static I dot4s(I acc, I w, I x) { return dot4(acc, _mm256_abs_epi8(x), _mm256_sign_epi8(w, x)); }
};
#endif

inline float half_to_float(uint16_t h) {
#ifdef PRESS_SIMD
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
// (int4) at a time, a tile of 64 columns of each, tile after tile across the column range: a
// handful of sequential streams the hardware prefetches, each row's cache line used whole, and
// independent accumulator chains per activation row to hide FMA latency. Converted weights are
// reused by up to kRowBlock activation rows before the next are read.

// Ask for rows [r0, r1), columns [c0, c1) of the weights now: a call's first block would otherwise
// wait on memory row by row before the in-loop prefetches (one block ahead) take over.
inline void prefetch_start(const int8_t* q, int64_t N, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
#ifdef PRESS_SIMD
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < c1; c += 64) _mm_prefetch(reinterpret_cast<const char*>(q + r * N + c), _MM_HINT_T0);
#endif
}

// ---- int8 and float32 weights: y[m0 : m0 + R, c : c + 16 V] += x[m0 : m0 + R, k0 : k0 + depth]
// q[k0 : k0 + depth, c : ...], with q int8 (widened in registers) or float32 (loaded as it is).
// `ahead`: bytes from each weight row to where the tile's next weights are, prefetched now.

#ifdef PRESS_SIMD
// y[m0 : m0 + R, c : c + P lanes] += x[m0 : m0 + R, k0 : k0 + depth] w[k0 : k0 + depth, c : ...]
// (`row`: w[k0, c]); prefetches `prefetch_bytes` of each weight row `ahead` bytes on.
template <typename W, int R, int P>
__attribute__((always_inline)) inline void weight_pass(const float* x, int64_t K, const W* row, int64_t N, float* y,
                                                       int64_t ldy, int64_t m0, int64_t k0, int64_t depth, int64_t c,
                                                       int64_t ahead, int64_t prefetch_bytes) {
  constexpr int L = Simd::kLanes;
  Simd::F acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) acc[r][v] = Simd::load(y + (m0 + r) * ldy + c + L * v);
  for (int64_t i = 0; i < depth; ++i, row += N) {
    const char* next = reinterpret_cast<const char*>(row) + ahead;
    for (int64_t line = 0; line < prefetch_bytes; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
    Simd::F xi[R];  // the broadcasts first, then one weight vector at a time (AVX2's 16 registers)
    for (int r = 0; r < R; ++r) xi[r] = Simd::broadcast(x + (m0 + r) * K + k0 + i);
    for (int v = 0; v < P; ++v) {
      const Simd::F w = Simd::load(row + L * v);
      for (int r = 0; r < R; ++r) acc[r][v] = Simd::fmadd(xi[r], w, acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) Simd::store(y + (m0 + r) * ldy + c + L * v, acc[r][v]);
}
#endif

// kNarrow: passes of Simd::kNarrowPass vectors (see there); kSole: Simd::kSolePass, for rows that are one block alone.
// tiled: q holds 16 x 64 tiles (see kTileRows), each contiguous, instead of rows of N.
template <typename W, int R, int V, bool kNarrow = false, bool kSole = false>
__attribute__((always_inline)) inline void weight_tile(const float* x, int64_t K, const W* q, int64_t N, float* y,
                                                       int64_t ldy, int64_t m0, int64_t k0, int64_t depth, int64_t c,
                                                       int64_t ahead, bool tiled) {
  // Where the tile's first weight row starts, and how far apart its rows are.
  const W* row = tiled ? q + k0 * N + c * kTileRows : q + k0 * N + c;
  const int64_t stride = tiled ? kTileCols : N;
#ifdef PRESS_SIMD
  // The tile's U vectors in passes of P (the last may be shorter); the first prefetches the whole tile,
  // but for one row of float32 weights, which streamed in 0.66-0.77x the time without (the
  // hardware's prefetcher follows its rows; benchmarks/kernel_calls.py, one thread, Zen 4); at 16 rows
  // the prefetches are worth 1.07-1.5x.
  constexpr bool kPrefetch = !(std::is_same_v<W, float> && R == 1);
  constexpr int L = Simd::kLanes, U = 16 * V / L;
  constexpr int most = kSole ? Simd::template kSolePass<R> : kNarrow ? Simd::template kNarrowPass<W, R> : Simd::kPass<R>;
  constexpr int P = most < U ? most : U, full = U / P * P;
  for (int u = 0; u < full; u += P)
    weight_pass<W, R, P>(x, K, row + L * u, stride, y, ldy, m0, k0, depth, c + L * u, ahead,
                         u == 0 && kPrefetch ? int64_t(sizeof(W)) * 16 * V : 0);
  if constexpr (full < U)
    weight_pass<W, R, U - full>(x, K, row + L * full, stride, y, ldy, m0, k0, depth, c + L * full, ahead, 0);
#else
  for (int r = 0; r < R; ++r) {
    float* ym = y + (m0 + r) * ldy + c;
    for (int64_t i = 0; i < depth; ++i) {
      const float xi = x[(m0 + r) * K + k0 + i];
      const W* w = row + i * stride;
      for (int j = 0; j < 16 * V; ++j) ym[j] += xi * static_cast<float>(w[j]);
    }
  }
#endif
}

// weight_tile for PRESS_DISPATCH, which names a template of <R, V> only.
template <typename W, bool kNarrow>
struct WeightTile {
  template <int R, int V>
  static void run(const float* x, int64_t K, const W* q, int64_t N, float* y, int64_t ldy, int64_t m0, int64_t k0,
                  int64_t depth, int64_t c, int64_t ahead, bool tiled) {
    weight_tile<W, R, V, kNarrow>(x, K, q, N, y, ldy, m0, k0, depth, c, ahead, tiled);
  }
};

// ---- int4: y[m0 : m0 + R, c : c + 16 V] += group g's contribution (sums[m * G + g]: the group's
// sum of x, for the zero point's constant term 8 scale + offset)

#ifdef PRESS_SIMD
// int4_tile's work for columns [col, col + P lanes) of group g (`row`: the group's first byte row there).
template <int R, int P>
__attribute__((always_inline)) inline void int4_pass(const float* xg, int64_t K, int64_t J, const int8_t* row,
                                                     int64_t N, const uint16_t* scale, const uint16_t* offset,
                                                     bool zero_point, const float* sums, int64_t G, int64_t g, float* y,
                                                     int64_t ldy, int64_t m0, int64_t col, int64_t ahead,
                                                     bool prefetch, int64_t stride) {
  constexpr int L = Simd::kLanes;
  Simd::F acc[R][P], acc2[R][P];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) acc[r][v] = acc2[r][v] = Simd::zero();
  for (int64_t j = 0; j < J; ++j, row += stride) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(row + ahead), _MM_HINT_T0);
    auto fma = [&](int r, int v, Simd::F xl, Simd::F xh, Simd::F lo, Simd::F hi) {
      if constexpr (R == 1) {  // two chains: the latency of one FMA after another would bind one row
        acc[r][v] = Simd::fmadd(xl, lo, acc[r][v]);
        acc2[r][v] = Simd::fmadd(xh, hi, acc2[r][v]);
      } else {
        acc[r][v] = Simd::fmadd(xh, hi, Simd::fmadd(xl, lo, acc[r][v]));
      }
    };
    // The pass's nibbles converted first where the registers hold them beside the accumulators
    // (AVX-512: 2-3% faster than a vector at a time), else the rows' broadcasts first.
    constexpr int kAccumulators = R == 1 ? 2 * P : R * P;
    if constexpr (2 * P + kAccumulators + 3 <= Simd::kRegisters) {
      Simd::F lo[P], hi[P];
      for (int v = 0; v < P; ++v) Simd::nibbles(row + L * v, lo[v], hi[v]);
      for (int r = 0; r < R; ++r) {
        const Simd::F xl = Simd::broadcast(xg + (m0 + r) * K + j), xh = Simd::broadcast(xg + (m0 + r) * K + J + j);
        for (int v = 0; v < P; ++v) fma(r, v, xl, xh, lo[v], hi[v]);
      }
    } else {
      Simd::F xl[R], xh[R];
      for (int r = 0; r < R; ++r) {
        xl[r] = Simd::broadcast(xg + (m0 + r) * K + j);
        xh[r] = Simd::broadcast(xg + (m0 + r) * K + J + j);
      }
      for (int v = 0; v < P; ++v) {
        Simd::F lo, hi;
        Simd::nibbles(row + L * v, lo, hi);
        for (int r = 0; r < R; ++r) fma(r, v, xl[r], xh[r], lo, hi);
      }
    }
  }
  for (int v = 0; v < P; ++v) {
    const int64_t at = g * N + col + L * v;
    const Simd::F s = Simd::load_half(scale + at);
    Simd::F constant = Simd::zero();
    if (zero_point) {
      constant = Simd::mul(Simd::set1(8.0f), s);
      if (offset) constant = Simd::add(constant, Simd::load_half(offset + at));
    }
    for (int r = 0; r < R; ++r) {
      float* ym = y + (m0 + r) * ldy + col + L * v;
      Simd::F out = Simd::fmadd(s, Simd::add(acc[r][v], acc2[r][v]), Simd::load(ym));
      if (zero_point) out = Simd::fmadd(Simd::set1(sums[(m0 + r) * G + g]), constant, out);
      Simd::store(ym, out);
    }
  }
}
#endif

template <int R, int V>
void int4_tile(const float* x, int64_t K, const int8_t* q, int64_t N, int64_t S, const uint16_t* scale,
               const uint16_t* offset, bool zero_point, const float* sums, float* y, int64_t ldy, int64_t m0,
               int64_t g, int64_t c, int64_t ahead, bool tiled) {
  const int64_t G = K / S, J = S / 2;
  const float* xg = x + g * S;
  // tiled: the group's J byte rows of each 64 columns are one contiguous run (kTileCols).
  const int8_t* first = tiled ? q + g * J * N + c * J : q + g * J * N + c;
  const int64_t stride = tiled ? kTileCols : N;
#ifdef PRESS_SIMD
  constexpr int L = Simd::kLanes, U = 16 * V / L, P = Simd::kPass4<R> < U ? Simd::kPass4<R> : U, full = U / P * P;
  for (int u = 0; u < full; u += P)
    int4_pass<R, P>(xg, K, J, first + L * u, N, scale, offset, zero_point, sums, G, g, y, ldy, m0, c + L * u, ahead,
                    u == 0, stride);
  if constexpr (full < U)
    int4_pass<R, U - full>(xg, K, J, first + L * full, N, scale, offset, zero_point, sums, G, g, y, ldy, m0,
                           c + L * full, ahead, false, stride);
#else
  for (int r = 0; r < R; ++r) {
    const float* xm = xg + (m0 + r) * K;
    float acc[16 * V] = {};
    for (int64_t j = 0; j < J; ++j) {
      const int8_t* row = first + j * stride;
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

// Float weights in calls of 5-15 rows: blocks of rows as even as they go (5 rows as 3 + 2, 9 as 3 + 3 + 3)
// where 4 + 1 and 4 + 4 + 1 had been. On AVX2 a block of 4 takes four passes over a tile (Simd::kPass)
// and one of 1 or 2 rows about what one of 3 does: float32 at 5 rows took 0.70-0.71x the time tiled
// (0.68-0.80x in rows), at 6 and 9 rows 0.90-0.94x, 8 and 17 the same; int8 (narrow passes) at 6 rows
// ran 1.02-1.05x slower, so it keeps blocks of 4 (benchmarks/kernel_calls.py --libraries, one thread,
// Zen 2). AVX-512's passes take a whole tile at any rows (not measured there: unchanged).
#ifdef PRESS_AVX2
constexpr bool kEvenBlocks = true;
#else
constexpr bool kEvenBlocks = false;
#endif

// weight_tile<W, R, 4> for the 64-column tiles of [c0, c1) one after another, rows 0 .. R - 1.
template <typename W, int R>
void weight_tiles(const float* x, int64_t K, const W* q, int64_t N, float* y, int64_t ldy, int64_t k0,
                  int64_t depth, int64_t c0, int64_t c1, int64_t ahead, bool tiled) {
  for (int64_t c = c0; c < c1; c += kTile)
    weight_tile<W, R, 4, false, true>(x, K, q, N, y, ldy, 0, k0, depth, c, ahead, tiled);
}

// y[:, c0:c1] (row stride ldy) = the products over inputs [k0, k1) (zeroed first; not scaled),
// for int8 or float32 weights W.
template <typename W>
void weight_part(const float* x, int64_t M, int64_t K, const W* q, int64_t N, float* y, int64_t ldy,
                 int64_t c0, int64_t c1, int64_t k0, int64_t k1, const NextWeights& next, int64_t p, int64_t parts,
                 bool tiled = false) {
  using Tile = WeightTile<W, false>;  // PRESS_DISPATCH's arguments can hold no comma
  using NarrowTile = WeightTile<W, true>;
  const bool narrow = sizeof(W) == 1 || M >= 16;  // where narrow passes ran faster (Simd::kNarrowPass)
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * ldy + c0, 0, sizeof(float) * (c1 - c0));
  const int64_t rows_per_block = N >= kWide ? kWideDepth : kDepth;
  const int64_t block_ahead = prefetch_ahead(N, rows_per_block) * int64_t(sizeof(W));
  prefetch_start(reinterpret_cast<const int8_t*>(q), N * int64_t(sizeof(W)), k0, std::min(k1, k0 + rows_per_block),
                 c0 * int64_t(sizeof(W)), c1 * int64_t(sizeof(W)));  // the loop fetches the rest ahead
  for (int64_t k = k0; k < k1; k += rows_per_block) {
    const int64_t depth = std::min(rows_per_block, k1 - k);
    const bool last = k + rows_per_block >= k1 && N < kWide;
    const int64_t ahead = last ? next.offset(reinterpret_cast<const int8_t*>(q + k * N), block_ahead, p, parts)
                               : block_ahead;
    if (M <= kRowBlock) {  // one block of rows: its tiles in one call (a wide block's tile is only 256 bytes)
      const int64_t full = c0 + (c1 - c0) / kTile * kTile;
      switch (M) {
        case 1: weight_tiles<W, 1>(x, K, q, N, y, ldy, k, depth, c0, full, ahead, tiled); break;
        case 2: weight_tiles<W, 2>(x, K, q, N, y, ldy, k, depth, c0, full, ahead, tiled); break;
        case 3: weight_tiles<W, 3>(x, K, q, N, y, ldy, k, depth, c0, full, ahead, tiled); break;
        default: weight_tiles<W, 4>(x, K, q, N, y, ldy, k, depth, c0, full, ahead, tiled); break;
      }
      if (full < c1)
        PRESS_DISPATCH(Tile::template run, M, (c1 - full) / 16, x, K, q, N, y, ldy, 0, k, depth, full, ahead, tiled)
      continue;
    }
    for (int64_t c = c0; c < c1; c += kTile) {  // the tile's converted weights reused by every block of rows
      const int64_t vecs = std::min(kTile, c1 - c) / 16;
      const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
      for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
        const int64_t rows = kEvenBlocks && !narrow ? (M - m0 + blocks - b - 1) / (blocks - b)  // as even as they go
                                                    : std::min(kRowBlock, M - m0);
        if (narrow)
          PRESS_DISPATCH(NarrowTile::template run, rows, vecs, x, K, q, N, y, ldy, m0, k, depth, c, ahead, tiled)
        else
          PRESS_DISPATCH(Tile::template run, rows, vecs, x, K, q, N, y, ldy, m0, k, depth, c, ahead, tiled)
        m0 += rows;
      }
    }
  }
}

// The same for packed int4 over groups [g0, g1), scales applied group by group
void int4_part(const float* x, int64_t M, int64_t K, const int8_t* q, int64_t N, int64_t S, const uint16_t* scale,
               const uint16_t* offset, bool zero_point, const float* sums, float* y, int64_t ldy, int64_t c0,
               int64_t c1, int64_t g0, int64_t g1, const NextWeights& next, int64_t p, int64_t parts, bool tiled) {
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * ldy + c0, 0, sizeof(float) * (c1 - c0));
  const int64_t block_ahead = prefetch_ahead(N, S / 2);
  if (g1 > g0) prefetch_start(q, N, g0 * (S / 2), (g0 + 1) * (S / 2), c0, c1);
  for (int64_t g = g0; g < g1; ++g) {
    const bool last = g + 1 == g1 && N < kWide;
    const int64_t ahead = last ? next.offset(q + g * (S / 2) * N, block_ahead, p, parts) : block_ahead;
    for (int64_t c = c0; c < c1; c += kTile) {
      const int64_t vecs = std::min(kTile, c1 - c) / 16;
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, M - m0);
        PRESS_DISPATCH(int4_tile, rows, vecs, x, K, q, N, S, scale, offset, zero_point, sums, y, ldy, m0, g, c, ahead,
                       tiled)
      }
    }
  }
}

// ---- the kernels' own workers
//
// A decode step calls these kernels some 200 times, 5-90 us each. Handing half of a call to
// XLA's intra-op pool (an Eigen pool whose idle threads sleep) costs a wake-up of tens of
// microseconds, often more than the half it hands over: measured, a SmolLM2 int8 step ran
// slower on two threads than on one. So the kernels keep their own workers, as llama.cpp does:
// one thread per further CPU the process may run on, spinning on a mailbox of its own between
// calls (yielding to other threads now and then) and sleeping on a condition variable after
// PRESS_SPIN_US (default 1000) without work.
// A caller offers its job to idle workers (compare-and-swap into their mailboxes), runs parts of
// it itself, claimed from the job's counter, and at the end takes back the offers nobody picked
// up, waiting only for workers that did. Two callers at once (XLA running independent thunks
// side by side, two models in one process) each get the workers that are free; a caller with
// none runs its job alone. After fork() the child starts workers of its own.

struct Job {
  void (*run)(const void*, int64_t);
  const void* context;
  int64_t parts;
  std::atomic<int64_t> next{0};
  void work() {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < parts;) run(context, p);
  }
};

Job* const kTaken = reinterpret_cast<Job*>(alignof(Job));  // a worker's mailbox while it runs a job

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct alignas(64) Worker {
  std::atomic<Job*> mailbox{nullptr};
  std::atomic<bool> sleeping{false};
  std::mutex mutex;
  std::condition_variable wake;
};

int64_t spin_microseconds() {
  const char* text = std::getenv("PRESS_SPIN_US");
  return text ? std::max<int64_t>(0, std::atoll(text)) : 1000;
}

class Workers {
 public:
  explicit Workers(int64_t n) : workers_(n), spin_(std::chrono::microseconds(spin_microseconds())) {
    for (auto& w : workers_) std::thread([this, &w] { loop(w); }).detach();
  }
  int64_t size() const { return static_cast<int64_t>(workers_.size()); }

  // Runs job.run(context, p) for every p in [0, job.parts) on the caller and up to `helpers` workers.
  void run(Job& job, int64_t helpers) {
    Worker* offered[kMaxWorkers];
    int64_t n = 0;
    for (auto& w : workers_) {
      if (n >= helpers) break;
      Job* idle = nullptr;
      if (!w.mailbox.compare_exchange_strong(idle, &job)) continue;  // busy with another caller's job
      offered[n++] = &w;
      if (w.sleeping.load()) {
        std::lock_guard<std::mutex> lock(w.mutex);
        w.wake.notify_one();
      }
    }
    job.work();
    for (int64_t i = 0; i < n; ++i) {
      Job* mine = &job;
      if (offered[i]->mailbox.compare_exchange_strong(mine, nullptr)) continue;  // never picked up
      // It is running parts: wait, giving the CPU up after a while (with more threads than CPUs,
      // as two test processes or another tenant make it, the worker may be waiting for this one).
      for (int64_t spins = 0; offered[i]->mailbox.load(std::memory_order_acquire) != nullptr; ++spins) {
        if (spins < 4096) cpu_relax();
        else std::this_thread::yield();
      }
    }
  }

  static constexpr int64_t kMaxWorkers = 255;

 private:
  void loop(Worker& w) {
    for (;;) {
      Job* job = next_job(w);
      // Claim it; a caller may have taken it back since (then the mailbox is empty, or holds
      // that caller's next offer, which the next round sees).
      if (job == nullptr || !w.mailbox.compare_exchange_strong(job, kTaken)) continue;
      job->work();
      w.mailbox.store(nullptr, std::memory_order_release);
    }
  }

  // A job seen in the mailbox, or null when it was taken back while this worker woke up.
  Job* next_job(Worker& w) {
    auto offered = [&w] {
      Job* job = w.mailbox.load(std::memory_order_acquire);
      return job != nullptr && job != kTaken ? job : nullptr;
    };
    const auto deadline = std::chrono::steady_clock::now() + spin_;
    for (int64_t i = 1;; ++i) {
      if (Job* job = offered()) return job;
      cpu_relax();
      if (i % 256 == 0) {
        if (std::chrono::steady_clock::now() > deadline) break;
        std::this_thread::yield();  // runs whatever else wants this CPU; returns at once when nothing does
      }
    }
    std::unique_lock<std::mutex> lock(w.mutex);
    w.sleeping.store(true);  // seq_cst, as the caller's offer then its read of `sleeping`
    w.wake.wait(lock, [&] { return offered() != nullptr; });
    w.sleeping.store(false);
    lock.unlock();
    if (wake_delay_.count()) std::this_thread::sleep_for(wake_delay_);  // tests: widen the window a caller takes its offer back in
    return offered();
  }

  std::vector<Worker> workers_;
  std::chrono::steady_clock::duration spin_;
  std::chrono::microseconds wake_delay_{std::atoll(std::getenv("PRESS_TEST_WAKE_DELAY_US") ? std::getenv("PRESS_TEST_WAKE_DELAY_US") : "0")};
};

int64_t usable_cpus() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

std::atomic<Workers*> g_workers{nullptr};
std::mutex g_workers_mutex;

void forget_workers_after_fork() {  // the child has none of the parent's threads
  g_workers.store(nullptr);
  new (&g_workers_mutex) std::mutex;
}

Workers& workers() {
  if (Workers* w = g_workers.load(std::memory_order_acquire)) return *w;
  std::lock_guard<std::mutex> lock(g_workers_mutex);
  if (g_workers.load() == nullptr) {
    static const int registered = pthread_atfork(nullptr, nullptr, forget_workers_after_fork);
    (void)registered;
    g_workers.store(new Workers(std::min(Workers::kMaxWorkers, usable_cpus() - 1)));  // kept to the process's end
  }
  return *g_workers.load();
}

// Run stripe(s) for s in [0, stripes) on the caller and up to threads - 1 workers.
template <typename Stripe>
void parallel_stripes(int64_t stripes, int64_t threads, Stripe stripe) {
  if (threads <= 1 || stripes <= 1) {
    for (int64_t s = 0; s < stripes; ++s) stripe(s);
    return;
  }
  Job job;
  job.run = [](const void* context, int64_t s) { (*static_cast<const Stripe*>(context))(s); };
  job.context = &stripe;
  job.parts = stripes;
  workers().run(job, std::min(threads, stripes) - 1);
}

#ifndef PRESS_MIN_SPLIT_BYTES
#define PRESS_MIN_SPLIT_BYTES (64 << 10)
#endif

// Threads for a matrix of `bytes`: one below PRESS_MIN_SPLIT_BYTES, where splitting costs more
// than it saves; else the caller and every worker, or `requested` of them.
int64_t thread_count(int64_t requested, int64_t bytes, int64_t rows) {
  if (bytes * std::max<int64_t>(1, rows / 4) < PRESS_MIN_SPLIT_BYTES) return 1;
  const int64_t available = workers().size() + 1;
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
void split_work(int64_t threads, int64_t M, int64_t N, int64_t units, float* y, Part part) {
  const bool wide = N >= kWide;
  const int64_t parts = std::max<int64_t>(1, std::min(threads, wide ? N / 16 : units));
  if (wide || parts == 1) {
    parallel_stripes(parts, parts, [=](int64_t p) {
      part(range_start(p, parts, N, 16), range_start(p + 1, parts, N, 16), 0, units, y, N, p, parts);
    });
    return;
  }
  std::vector<float> scratch((parts - 1) * M * N);
  float* extra = scratch.data();
  parallel_stripes(parts, parts, [=](int64_t p) {
    part(0, N, range_start(p, parts, units, 1), range_start(p + 1, parts, units, 1),
         p == 0 ? y : extra + (p - 1) * M * N, N, p, parts);
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

// The next call's weights from a stack [L, ...] (int8 codes or float32) and a layer (none: a
// one-element stack).
template <ffi::DataType T>
NextWeights next_weights(ffi::Buffer<T>& stack, ffi::Buffer<ffi::S32>& layer) {
  auto dims = stack.dimensions();
  const int64_t total = stack.element_count();
  if (dims.size() < 2 || total < 2) return {};
  const int64_t bytes = total / dims[0] * int64_t(sizeof(*stack.typed_data()));
  return {reinterpret_cast<const int8_t*>(stack.typed_data()) + std::clamp<int64_t>(*layer.typed_data(), 0, dims[0] - 1) * bytes,
          bytes};
}

// Whether weights said to be tiled (kTileRows) can be: whole tiles, narrower than kWide.
ffi::Error check_tiled(bool tiled, int64_t K, int64_t N, const char* kernel) {
  if (tiled && (kDepth != kTileRows || K % kTileRows || N % kTileCols || N >= kWide))
    return ffi::Error::InvalidArgument(std::string(kernel) + ": tiled weights need K % 16 == 0, N % 64 == 0 and N < " +
                                       std::to_string(kWide) + " (and a build with PRESS_DEPTH 16)");
  return ffi::Error::Success();
}

// What an int8-weight call reads: x [M, K], layer `layer` of q [L, K, N] and of scale [L, N], y.
struct Int8Call {
  int64_t M, K, N;
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  ffi::Error read(ffi::Buffer<ffi::F32>& x_in, ffi::Buffer<ffi::S8>& q_in, ffi::Buffer<ffi::F32>& scale_in,
                  ffi::Buffer<ffi::S32>& layer, ffi::ResultBuffer<ffi::F32>& y_out, const char* kernel) {
    auto dims = q_in.dimensions();
    if (dims.size() != 3) return ffi::Error::InvalidArgument(std::string(kernel) + ": weights must be [L, K, N]");
    K = dims[1], N = dims[2], M = x_in.element_count() / K;
    if (auto error = check(M, N); error.failure()) return error;
    int64_t l;
    if (auto error = layer_of(layer, dims[0], &l); error.failure()) return error;
    x = x_in.typed_data(), q = q_in.typed_data() + l * K * N, scale = scale_in.typed_data() + l * N;
    y = y_out->typed_data();
    return ffi::Error::Success();
  }
};

// y [M, N] = x [M, K] @ w [K, N] (int8 codes, unscaled, or float32), split between threads in
// whole blocks of kDepth inputs (or, for a wide matrix, by columns).
template <typename W>
void weights_matmul(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int64_t threads,
                    const NextWeights& next, bool tiled = false) {
  split_work(thread_count(threads, K * N * int64_t(sizeof(W)), M), M, N, (K + kDepth - 1) / kDepth, y,
             [=](int64_t c0, int64_t c1, int64_t b0, int64_t b1, float* out, int64_t ldy, int64_t p,
                        int64_t parts) {
               weight_part(x, M, K, w, N, out, ldy, c0, c1, b0 * kDepth, std::min(K, b1 * kDepth), next, p, parts,
                           tiled);
             });
}

ffi::Error Int8Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S8> next_q,
                      ffi::Buffer<ffi::S32> next_layer, ffi::ResultBuffer<ffi::F32> y, int64_t threads, bool tiled) {
  Int8Call call;
  if (auto error = call.read(x, q, scale, layer, y, "press int8 kernel"); error.failure()) return error;
  const int64_t K = call.K, N = call.N, M = call.M;
  if (auto error = check_tiled(tiled, K, N, "press int8 kernel"); error.failure()) return error;
  const float *xp = call.x, *sp = call.scale;
  const int8_t* qp = call.q;
  float* yp = call.y;
  weights_matmul(xp, M, K, qp, N, yp, threads, next_weights(next_q, next_layer), tiled);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < N; ++c) yp[m * N + c] *= sp[c];
  return ffi::Error::Success();
}

// Float weights (W: float32, or Bf16 for bfloat16), for float models' decode steps:
// x [M, K] @ layer `layer` of w [L, K, N] -> y.
template <typename W, ffi::DataType T>
ffi::Error FloatMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::Buffer<ffi::S32> layer, ffi::Buffer<T> next_w,
                       ffi::Buffer<ffi::S32> next_layer, ffi::ResultBuffer<ffi::F32> y, int64_t threads, bool tiled,
                       const char* kernel) {
  auto dims = w.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument(std::string(kernel) + ": weights must be [L, K, N]");
  const int64_t K = dims[1], N = dims[2], M = x.element_count() / K;
  if (auto error = check(M, N); error.failure()) return error;
  int64_t l;
  if (auto error = layer_of(layer, dims[0], &l); error.failure()) return error;
  if (auto error = check_tiled(tiled, K, N, kernel); error.failure()) return error;
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.typed_data()) + l * K * N;
  float* yp = y->typed_data();
  weights_matmul(xp, M, K, wp, N, yp, threads, next_weights(next_w, next_layer), tiled);
  return ffi::Error::Success();
}

ffi::Error F32Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::F32> next_w, ffi::Buffer<ffi::S32> next_layer, ffi::ResultBuffer<ffi::F32> y,
                     int64_t threads, bool tiled) {
  return FloatMatmul<float>(x, w, layer, next_w, next_layer, y, threads, tiled, "press f32 kernel");
}

ffi::Error Bf16Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> layer,
                      ffi::Buffer<ffi::BF16> next_w, ffi::Buffer<ffi::S32> next_layer, ffi::ResultBuffer<ffi::F32> y,
                      int64_t threads, bool tiled) {
  return FloatMatmul<Bf16>(x, w, layer, next_w, next_layer, y, threads, tiled, "press bf16 kernel");
}

ffi::Error Int4Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> offset, ffi::Buffer<ffi::S32> layer,
                      ffi::Buffer<ffi::S8> next_q, ffi::Buffer<ffi::S32> next_layer, ffi::ResultBuffer<ffi::F32> y,
                      int64_t threads, bool zero_point, bool has_offset, bool tiled) {
  auto dims = q.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("press int4 kernel: codes must be [L, G, S/2, N]");
  const int64_t G = dims[1], S = 2 * dims[2], N = dims[3], K = G * S, M = x.element_count() / K;
  if (auto error = check(M, N); error.failure()) return error;
  if (tiled && (N % kTileCols || N >= kWide))
    return ffi::Error::InvalidArgument("press int4 kernel: tiled codes need N % 64 == 0 and N < " + std::to_string(kWide));
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
  const NextWeights next = next_weights(next_q, next_layer);
  split_work(thread_count(threads, K * N / 2, M), M, N, G, yp,
             [=](int64_t c0, int64_t c1, int64_t g0, int64_t g1, float* out, int64_t ldy, int64_t p, int64_t parts) {
               int4_part(xp, M, K, qp, N, S, sp, op, zero_point, sums_p, out, ldy, c0, c1, g0, g1, next, p, parts,
                         tiled);
             });
  return ffi::Error::Success();
}

#ifdef PRESS_SIMD
// One row of activations to int8 codes (w8a8's rows, w4a8's groups): step = max|x| / 127 (1 for a
// row of zeros), codes = round-half-even(x / step) clipped to +-127, and the codes' sum.
inline void quantize_row(const float* x, int64_t K, int8_t* codes, float* step_out, int32_t* sum_out) {
  constexpr int L = Simd::kLanes;
  Simd::F top = Simd::zero();
  int64_t k = 0;
  for (; k + L <= K; k += L) top = Simd::max(top, Simd::abs(Simd::load(x + k)));
  float most = Simd::max_lane(top);
  for (; k < K; ++k) most = std::max(most, std::fabs(x[k]));
  const float step = most > 0.0f ? most / 127.0f : 1.0f;
  const Simd::F vstep = Simd::set1(step), lo = Simd::set1(-127.0f), hi = Simd::set1(127.0f);
  Simd::I total = Simd::izero();
  int32_t tail = 0;
  for (k = 0; k + L <= K; k += L) {
    const Simd::I code = Simd::to_int(Simd::min(Simd::max(Simd::div(Simd::load(x + k), vstep), lo), hi));
    total = Simd::iadd(total, code);
    Simd::store_codes(codes + k, code);
  }
  for (; k < K; ++k) {
    const int32_t code = static_cast<int32_t>(std::nearbyint(std::clamp(x[k] / step, -127.0f, 127.0f)));
    codes[k] = static_cast<int8_t>(code);
    tail += code;
  }
  *step_out = step;
  *sum_out = Simd::isum(total) + tail;
}

// Rows x [M, K] rounded group by group (S inputs each, quantize_row): codes [M, K], and per row
// and group [M, K / S] the step and the codes' sum (w4a8's and w8a8-gN's activations).
struct GroupCodes {
  std::vector<int8_t> codes;
  std::vector<float> steps;
  std::vector<int32_t> sums;
  GroupCodes(const float* x, int64_t M, int64_t K, int64_t S) : codes(M * K), steps(M * (K / S)), sums(M * (K / S)) {
    const int64_t G = K / S;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g)
        quantize_row(x + m * K + g * S, S, codes.data() + m * K + g * S, &steps[m * G + g], &sums[m * G + g]);
  }
};
#endif

// ---- w8a8: int8 weights times int8 activations on integer dot products (AVX-512 VNNI)
//
// Where a step carries 16-64 rows the float kernels above are bound by their multiplies, not by
// the weights' bytes: each weight is widened to float and meets every row in a float FMA (16
// products an instruction). vpdpbusd multiplies 64 bytes by 64 bytes into 16 int32 sums, four
// times the products, with no widening. So the w8a8 scheme's matmul runs here as:
//   x [M, K] f32 -> per row: scale sx[m] = max|x[m]| / 127, codes xq = round(x / sx) in -127..127
//                   (AQT's per-token numerics, compress/quant/aqt_matmul.py)
//   y[m, n] = sx[m] * scale[n] * sum_k xq[m, k] q[k, n]
// vpdpbusd takes one unsigned operand: the weights, moved to 0..255 by flipping their top bit
// (q + 128), so each sum carries 128 * sum_k xq[m, k], subtracted at the end. Its lanes each sum
// four consecutive inputs of one column: a block of four weight rows is interleaved in registers
// (two rounds of byte/word unpacks, per 128-bit lane) into a small buffer reused by every block
// of activation rows, the four inputs of a row's codes broadcast to every lane. The unpacks
// leave a 64-column tile's columns permuted (lane L of unpacked group g holds columns
// 16 L + 4 g .. + 3), undone when the int32 sums become floats. K % 4 == 0 and N % 64 == 0.

#if defined(PRESS_AVX512) && defined(__AVX512VNNI__)
#define PRESS_VNNI 1
constexpr int64_t kQuadBlock = 16;  // quads of inputs (64 weight rows) interleaved at a time

// Interleave weight rows k .. k + 4 quads * 4 of columns [c, c + 64) into buf[quad][group] (u8).
// `ahead`: bytes ahead of each row the weights are prefetched (the next block of rows, or along a wide row).
inline void interleave_quads(const int8_t* q, int64_t N, int64_t k, int64_t quads, int64_t c, __m512i* buf,
                             int64_t ahead) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = 0; j < quads; ++j) {
    const int8_t* row = q + (k + 4 * j) * N + c;
    for (int64_t i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(row + i * N + ahead), _MM_HINT_T0);
    const __m512i r0 = _mm512_xor_si512(_mm512_loadu_si512(row), flip);
    const __m512i r1 = _mm512_xor_si512(_mm512_loadu_si512(row + N), flip);
    const __m512i r2 = _mm512_xor_si512(_mm512_loadu_si512(row + 2 * N), flip);
    const __m512i r3 = _mm512_xor_si512(_mm512_loadu_si512(row + 3 * N), flip);
    const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
    const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
    buf[4 * j + 0] = _mm512_unpacklo_epi16(t0, t2);
    buf[4 * j + 1] = _mm512_unpackhi_epi16(t0, t2);
    buf[4 * j + 2] = _mm512_unpacklo_epi16(t1, t3);
    buf[4 * j + 3] = _mm512_unpackhi_epi16(t1, t3);
  }
}

// acc[m0 .. m0 + R) [4 groups] += the quads' products with rows m0.. of the codes xq (ld K4 int32
// words: four codes each), read from and written back to sums (int32, permuted tile order).
template <int R>
inline void w8a8_rows(const int32_t* xq, int64_t K4, int64_t m0, int64_t k4, int64_t quads, const __m512i* buf,
                      int32_t* sums, int64_t lds, int64_t c) {
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_loadu_si512(sums + (m0 + r) * lds + c + 16 * g);
  for (int64_t j = 0; j < quads; ++j)
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(xq[(m0 + r) * K4 + k4 + j]);
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_dpbusd_epi32(acc[r][g], buf[4 * j + g], a);
    }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) _mm512_storeu_si512(sums + (m0 + r) * lds + c + 16 * g, acc[r][g]);
}

// sums[:, c0:c1] (ld lds, zeroed first) = products over inputs [k0, k1) (multiples of 4).
void w8a8_part(const int32_t* xq, int64_t M, int64_t K, const int8_t* q, int64_t N, int32_t* sums, int64_t lds,
               int64_t c0, int64_t c1, int64_t k0, int64_t k1) {
  for (int64_t m = 0; m < M; ++m) std::memset(sums + m * lds + c0, 0, sizeof(int32_t) * (c1 - c0));
  const int64_t K4 = K / 4;
  alignas(64) __m512i buf[4 * kQuadBlock];
  const int64_t ahead = N >= kWide ? kPrefetch : 4 * kQuadBlock * N;
  prefetch_start(q, N, k0, std::min(k1, k0 + 4 * kQuadBlock), c0, c1);
  for (int64_t k = k0; k < k1; k += 4 * kQuadBlock) {
    const int64_t quads = std::min<int64_t>(kQuadBlock, (k1 - k) / 4);
    for (int64_t c = c0; c < c1; c += 64) {
      interleave_quads(q, N, k, quads, c, buf, ahead);
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) w8a8_rows<4>(xq, K4, m0, k / 4, quads, buf, sums, lds, c);
      switch (M - m0) {
        case 3: w8a8_rows<3>(xq, K4, m0, k / 4, quads, buf, sums, lds, c); break;
        case 2: w8a8_rows<2>(xq, K4, m0, k / 4, quads, buf, sums, lds, c); break;
        case 1: w8a8_rows<1>(xq, K4, m0, k / 4, quads, buf, sums, lds, c); break;
        default: break;
      }
    }
  }
}

ffi::Error W8A8Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  Int8Call call;
  if (auto error = call.read(x, q, scale, layer, y, "press w8a8 kernel"); error.failure()) return error;
  const int64_t K = call.K, N = call.N, M = call.M;
  if (K % 4 || N % 64) return ffi::Error::InvalidArgument("press w8a8 kernel: needs K % 4 == 0 and N % 64 == 0");
  const float *xp = call.x, *sp = call.scale;
  const int8_t* qp = call.q;
  float* yp = call.y;
  // The activations' codes (four to an int32 word, as vpdpbusd broadcasts them), scales and sums.
  std::vector<int8_t> codes(M * K);
  std::vector<float> row_scale(M);
  std::vector<int32_t> row_sum(M);
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, codes.data() + m * K, &row_scale[m], &row_sum[m]);
  const int32_t* xq = reinterpret_cast<const int32_t*>(codes.data());
  const int64_t blocks = (K / 4 + kQuadBlock - 1) / kQuadBlock;
  const int64_t workers_wanted = thread_count(threads, K * N, M);
  const bool wide = N >= kWide;
  const int64_t parts = std::max<int64_t>(1, std::min(workers_wanted, wide ? N / 64 : blocks));
  std::vector<int32_t> sums((wide ? 1 : parts) * M * N);
  int32_t* sums_p = sums.data();
  parallel_stripes(parts, parts, [=](int64_t p) {
    if (wide) {
      const int64_t c0 = N / 64 * p / parts * 64, c1 = N / 64 * (p + 1) / parts * 64;
      w8a8_part(xq, M, K, qp, N, sums_p, N, c0, c1, 0, K);
    } else {
      const int64_t k0 = blocks * p / parts * 4 * kQuadBlock, k1 = std::min(K, blocks * (p + 1) / parts * 4 * kQuadBlock);
      w8a8_part(xq, M, K, qp, N, sums_p + p * M * N, N, 0, N, k0, k1);
    }
  });
  const int64_t sets = wide ? 1 : parts;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < N; c += 64) {
      __m512i g[4];
      for (int64_t i = 0; i < 4; ++i) {
        g[i] = _mm512_loadu_si512(sums_p + m * N + c + 16 * i);
        for (int64_t set = 1; set < sets; ++set)
          g[i] = _mm512_add_epi32(g[i], _mm512_loadu_si512(sums_p + set * M * N + m * N + c + 16 * i));
      }
      // Back to column order: out[L] = lane L of g[0], g[1], g[2], g[3] (a 4 x 4 transpose of lanes).
      const __m512i a = _mm512_shuffle_i32x4(g[0], g[1], 0x44), b = _mm512_shuffle_i32x4(g[2], g[3], 0x44);
      const __m512i cc = _mm512_shuffle_i32x4(g[0], g[1], 0xEE), d = _mm512_shuffle_i32x4(g[2], g[3], 0xEE);
      const __m512i out[4] = {_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD),
                              _mm512_shuffle_i32x4(cc, d, 0x88), _mm512_shuffle_i32x4(cc, d, 0xDD)};
      const __m512i offset = _mm512_set1_epi32(128 * row_sum[m]);
      const __m512 rs = _mm512_set1_ps(row_scale[m]);
      for (int64_t i = 0; i < 4; ++i) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(out[i], offset));
        _mm512_storeu_ps(yp + m * N + c + 16 * i, _mm512_mul_ps(_mm512_mul_ps(v, rs), _mm512_loadu_ps(sp + c + 16 * i)));
      }
    }
  return ffi::Error::Success();
}

#endif  // PRESS_VNNI

// ---- w4a8: packed int4 groups times int8 activations per group (integer products), tiled codes
//
// The w4a8-gN schemes keep int4-gN's stored weights and quantize each group of N activations of
// a row to int8 with its own step (max |x| / 127, round half to even: quantize_row), as GGUF's
// Q4_1 meets Q8_1 activations. A group's products are then integer sums of the codes' unsigned
// nibbles (u = code + 8, 0..15: the stored nibble with its top bit flipped) times four activation
// codes at a time (Simd::dot4: vpdpbusd on AVX-512 VNNI, 64 products an instruction; vpmaddubsw
// and vpmaddwd on AVX2, as llama.cpp's Q4_1 x Q8_1), where the float int4 loops above convert
// every nibble to float (bound by those conversions at one row, not by the bytes).
//   y[m, n] = sum_g step[m, g] * (scale[g, n] * (usum - 8 csum) + csum * constant[g, n])
// usum: the group's sum of u times the codes, csum: the sum of the codes, constant: 8 scale +
// offset for asymmetric groups (w = scale * u + offset), else 0 (w = scale * (u - 8)).
// Layout (compress/quant/matmul.py w4a8_tile): int4's tiles (a group's J = N/2 byte rows of 64
// columns, one run), each ordered [J/4 quads][64 columns][4 byte rows], so that a vector's 32-bit
// lane holds one column's four byte rows of a quad: its low nibbles meet the codes of inputs
// 4j .. 4j + 3 and its high nibbles those of J + 4j .. + 3.
#ifdef PRESS_SIMD
constexpr int kW4Vectors = kTileCols / Simd::kLanes;  // integer vectors across a tile's 64 columns
constexpr int64_t kW4VectorBytes = 4 * Simd::kLanes;  // each lane four byte rows of one column

// A tile's unsigned nibbles, split into low and high halves: unpacked[2 (kW4Vectors j + v)] and [... + 1].
inline void w4a8_unpack(const int8_t* tile, int64_t J, int64_t ahead, Simd::I* unpacked) {
  const Simd::I flip = Simd::bytes(static_cast<char>(0x88)), low = Simd::bytes(0x0F);
  for (int64_t j = 0; j < J / 4; ++j) {
    const int8_t* at = tile + j * 256;
    for (int line = 0; line < 256; line += 64) _mm_prefetch(reinterpret_cast<const char*>(at + ahead + line), _MM_HINT_T0);
    for (int v = 0; v < kW4Vectors; ++v) {
      const Simd::I u = Simd::bit_xor(Simd::load_i(at + kW4VectorBytes * v), flip);
      unpacked[2 * (kW4Vectors * j + v)] = Simd::bit_and(u, low);
      unpacked[2 * (kW4Vectors * j + v) + 1] = Simd::bit_and(Simd::shift_right4(u), low);
    }
  }
}

// Rows m0 .. m0 + R of one tile, in passes of Simd::kPassI<R> vectors of columns: its nibbles
// unpacked here (kUnpacked false: a block of rows that is the whole batch) or read from
// `unpacked` (w4a8_unpack's, shared by every block of rows).
template <int R, bool kUnpacked = false>
inline void w4a8_tile(const int8_t* codes, const float* step, const int32_t* csum, int64_t K, int64_t G, int64_t S,
                      const int8_t* tile, const uint16_t* scale, const uint16_t* offset, bool zero_point, float* y,
                      int64_t ldy, int64_t m0, int64_t g, int64_t N, int64_t c, int64_t ahead,
                      const Simd::I* unpacked = nullptr) {
  constexpr int P = Simd::template kPassI<R>, L = Simd::kLanes;
  const int64_t J = S / 2;
  const Simd::I flip = Simd::bytes(static_cast<char>(0x88)), low = Simd::bytes(0x0F);
  const int32_t* xq[R];
  for (int r = 0; r < R; ++r) xq[r] = reinterpret_cast<const int32_t*>(codes + (m0 + r) * K + g * S);
  for (int p0 = 0; p0 < kW4Vectors; p0 += P) {
    Simd::I acc[R][P];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < P; ++v) acc[r][v] = Simd::izero();
    for (int64_t j = 0; j < J / 4; ++j) {
      const int8_t* at = tile + j * 256;
      if constexpr (!kUnpacked)
        if (p0 == 0)
          for (int line = 0; line < 256; line += 64) _mm_prefetch(reinterpret_cast<const char*>(at + ahead + line), _MM_HINT_T0);
      Simd::I lo_codes[R], hi_codes[R];
      for (int r = 0; r < R; ++r) {
        lo_codes[r] = Simd::words(xq[r][j]);
        hi_codes[r] = Simd::words(xq[r][J / 4 + j]);
      }
      for (int v = 0; v < P; ++v) {
        Simd::I lo, hi;
        if constexpr (kUnpacked) {
          lo = unpacked[2 * (kW4Vectors * j + p0 + v)], hi = unpacked[2 * (kW4Vectors * j + p0 + v) + 1];
        } else {
          const Simd::I u = Simd::bit_xor(Simd::load_i(at + kW4VectorBytes * (p0 + v)), flip);
          lo = Simd::bit_and(u, low), hi = Simd::bit_and(Simd::shift_right4(u), low);
        }
        for (int r = 0; r < R; ++r) acc[r][v] = Simd::dot4(Simd::dot4(acc[r][v], lo, lo_codes[r]), hi, hi_codes[r]);
      }
    }
    for (int v = 0; v < P; ++v) {
      const int64_t at = g * N + c + L * (p0 + v);
      const Simd::F s = Simd::load_half(scale + at);
      Simd::F constant = Simd::zero();
      if (zero_point) {
        constant = Simd::mul(Simd::set1(8.0f), s);
        if (offset) constant = Simd::add(constant, Simd::load_half(offset + at));
      }
      for (int r = 0; r < R; ++r) {
        const int32_t cs = csum[(m0 + r) * G + g];
        const Simd::F sums = Simd::to_float(Simd::isub(acc[r][v], Simd::words(8 * cs)));
        const Simd::F group = Simd::fmadd(s, sums, Simd::mul(Simd::set1(static_cast<float>(cs)), constant));
        float* ym = y + (m0 + r) * ldy + c + L * (p0 + v);
        Simd::store(ym, Simd::fmadd(Simd::set1(step[(m0 + r) * G + g]), group, Simd::load(ym)));
      }
    }
  }
}

ffi::Error W4A8Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F16> scale,
                      ffi::Buffer<ffi::F16> offset, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S8> next_q,
                      ffi::Buffer<ffi::S32> next_layer, ffi::ResultBuffer<ffi::F32> y, int64_t threads,
                      bool zero_point, bool has_offset) {
  auto dims = q.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("press w4a8 kernel: codes must be [L, G, S/2, N]");
  const int64_t G = dims[1], S = 2 * dims[2], N = dims[3], K = G * S, M = x.element_count() / K;
  if (auto error = check(M, N); error.failure()) return error;
  if (S % 8 || N % kTileCols || N >= kWide)
    return ffi::Error::InvalidArgument("press w4a8 kernel: tiled codes need groups of a multiple of 8, N % 64 == 0 "
                                       "and N < " + std::to_string(kWide));
  int64_t l;
  if (auto error = layer_of(layer, dims[0], &l); error.failure()) return error;
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data() + l * G * (S / 2) * N;
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.typed_data()) + l * G * N;
  const uint16_t* op = has_offset ? reinterpret_cast<const uint16_t*>(offset.typed_data()) + l * G * N : nullptr;
  float* yp = y->typed_data();
  const GroupCodes rounded(xp, M, K, S);
  const int8_t* cp = rounded.codes.data();
  const float* stp = rounded.steps.data();
  const int32_t* csp = rounded.sums.data();
  const NextWeights next = next_weights(next_q, next_layer);
  const int64_t J = S / 2;
  split_work(thread_count(threads, K * N / 2, M), M, N, G, yp,
             [=](int64_t c0, int64_t c1, int64_t g0, int64_t g1, float* out, int64_t ldy, int64_t p, int64_t parts) {
               for (int64_t m = 0; m < M; ++m) std::memset(out + m * ldy + c0, 0, sizeof(float) * (c1 - c0));
               if (g1 > g0) prefetch_start(qp, N, g0 * J, (g0 + 1) * J, c0, c1);
               std::vector<Simd::I> unpacked(M > 4 ? 2 * (J / 4) * kW4Vectors : 0);  // lo and hi of each vector
               for (int64_t g = g0; g < g1; ++g) {
                 const bool last = g + 1 == g1;
                 const int64_t ahead = last ? next.offset(qp + g * J * N, J * N, p, parts) : J * N;
                 for (int64_t c = c0; c < c1; c += kTile) {
                   const int8_t* tile = qp + g * J * N + c * J;
                   if (M <= 4) {  // one block of rows: the nibbles unpacked in registers as they are read
                     switch (M) {
                       case 4: w4a8_tile<4>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, 0, g, N, c, ahead); break;
                       case 3: w4a8_tile<3>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, 0, g, N, c, ahead); break;
                       case 2: w4a8_tile<2>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, 0, g, N, c, ahead); break;
                       default: w4a8_tile<1>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, 0, g, N, c, ahead); break;
                     }
                     continue;
                   }
                   w4a8_unpack(tile, J, ahead, unpacked.data());  // once, for every block of rows
                   const Simd::I* u = unpacked.data();
                   int64_t m0 = 0;
                   for (; m0 + 4 <= M; m0 += 4)
                     w4a8_tile<4, true>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, m0, g, N, c, ahead, u);
                   switch (M - m0) {
                     case 3: w4a8_tile<3, true>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, m0, g, N, c, ahead, u); break;
                     case 2: w4a8_tile<2, true>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, m0, g, N, c, ahead, u); break;
                     case 1: w4a8_tile<1, true>(cp, stp, csp, K, G, S, tile, sp, op, zero_point, out, ldy, m0, g, N, c, ahead, u); break;
                     default: break;
                   }
                 }
               }
             });
  return ffi::Error::Success();
}

// ---- w8a8-gN: int8 weights (a scale per output) times int8 activations per group, tiled codes
//
// The w8a8-gN schemes keep int8's stored weights and quantize each group of N activations of a row
// to int8 with its own step, as GGUF's Q8_0 x Q8_0 products do: a group's products are integer
// sums (Simd::dot4s), where the int8 kernel above widens every weight to float (on AVX2, 8 at a
// time: bound by those conversions at one row). y[m, n] = scale[n] sum_g step[m, g] isum[m, g, n].
// Layout (compress/quant/matmul.py w8a8g_tile): each group's N/4 quads of input rows, per 64
// columns one run [N/4 quads][64 columns][4 input rows], so a vector's 32-bit lane holds one
// column's four inputs of a quad. Built with AVX2 and with AVX-512 VNNI (AVX-512BW has no vpsignb).
#if defined(PRESS_AVX2) || defined(PRESS_VNNI)
#define PRESS_W8A8G 1

template <int R>
inline void w8a8g_tile(const int8_t* codes, const float* step, const int32_t* csum, int64_t K, int64_t G, int64_t S,
                       const int8_t* tile, const float* scale, float* y, int64_t ldy, int64_t m0, int64_t g,
                       int64_t c, int64_t ahead) {
  constexpr int P = Simd::template kPassI<R>, L = Simd::kLanes;
  const int32_t* xq[R];
  for (int r = 0; r < R; ++r) xq[r] = reinterpret_cast<const int32_t*>(codes + (m0 + r) * K + g * S);
  for (int p0 = 0; p0 < kW4Vectors; p0 += P) {
    Simd::I acc[R][P];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < P; ++v) acc[r][v] = Simd::izero();
    for (int64_t j = 0; j < S / 4; ++j) {
      const int8_t* at = tile + j * 256;
      if (p0 == 0)
        for (int line = 0; line < 256; line += 64) _mm_prefetch(reinterpret_cast<const char*>(at + ahead + line), _MM_HINT_T0);
      Simd::I x[R];
      for (int r = 0; r < R; ++r) x[r] = Simd::words(xq[r][j]);
      for (int v = 0; v < P; ++v) {
        const Simd::I w = Simd::load_i(at + kW4VectorBytes * (p0 + v));
        for (int r = 0; r < R; ++r) acc[r][v] = Simd::dot4s(acc[r][v], w, x[r]);
      }
    }
    for (int v = 0; v < P; ++v) {
      const Simd::F s = Simd::load(scale + c + L * (p0 + v));
      for (int r = 0; r < R; ++r) {
        const int32_t bias = Simd::kSignedBias * csum[(m0 + r) * G + g];
        const Simd::F sums = Simd::to_float(Simd::isub(acc[r][v], Simd::words(bias)));
        float* ym = y + (m0 + r) * ldy + c + L * (p0 + v);
        Simd::store(ym, Simd::fmadd(Simd::mul(Simd::set1(step[(m0 + r) * G + g]), s), sums, Simd::load(ym)));
      }
    }
  }
}

ffi::Error W8A8GMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S8> next_q, ffi::Buffer<ffi::S32> next_layer,
                       ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t group) {
  auto dims = q.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("press w8a8-g kernel: codes must be [L, K, N]");
  const int64_t K = dims[1], N = dims[2], S = group, M = x.element_count() / std::max<int64_t>(K, 1);
  if (auto error = check(M, N); error.failure()) return error;
  if (S <= 0 || S % 4 || K % S || N % kTileCols || N >= kWide || scale.element_count() != dims[0] * N)
    return ffi::Error::InvalidArgument("press w8a8-g kernel: tiled codes need groups of a multiple of 4 dividing K, "
                                       "N % 64 == 0, N < " + std::to_string(kWide) + " and a scale per output");
  int64_t l;
  if (auto error = layer_of(layer, dims[0], &l); error.failure()) return error;
  const int64_t G = K / S;
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data() + l * K * N;
  const float* sp = scale.typed_data() + l * N;
  float* yp = y->typed_data();
  const GroupCodes rounded(xp, M, K, S);
  const int8_t* cp = rounded.codes.data();
  const float* stp = rounded.steps.data();
  const int32_t* csp = rounded.sums.data();
  const NextWeights next = next_weights(next_q, next_layer);
  split_work(thread_count(threads, K * N, M), M, N, G, yp,
             [=](int64_t c0, int64_t c1, int64_t g0, int64_t g1, float* out, int64_t ldy, int64_t p, int64_t parts) {
               for (int64_t m = 0; m < M; ++m) std::memset(out + m * ldy + c0, 0, sizeof(float) * (c1 - c0));
               if (g1 > g0) prefetch_start(qp, N, g0 * S, (g0 + 1) * S, c0, c1);
               for (int64_t g = g0; g < g1; ++g) {
                 const bool last = g + 1 == g1;
                 const int64_t ahead = last ? next.offset(qp + g * S * N, S * N, p, parts) : S * N;
                 for (int64_t c = c0; c < c1; c += kTile) {
                   const int8_t* tile = qp + g * S * N + c * S;
                   int64_t m0 = 0;
                   for (; m0 + 4 <= M; m0 += 4) w8a8g_tile<4>(cp, stp, csp, K, G, S, tile, sp, out, ldy, m0, g, c, ahead);
                   switch (M - m0) {
                     case 3: w8a8g_tile<3>(cp, stp, csp, K, G, S, tile, sp, out, ldy, m0, g, c, ahead); break;
                     case 2: w8a8g_tile<2>(cp, stp, csp, K, G, S, tile, sp, out, ldy, m0, g, c, ahead); break;
                     case 1: w8a8g_tile<1>(cp, stp, csp, K, G, S, tile, sp, out, ldy, m0, g, c, ahead); break;
                     default: break;
                   }
                 }
               }
             });
  return ffi::Error::Success();
}
#endif  // PRESS_W8A8G
#endif  // PRESS_SIMD

// ---- decode attention: a few query positions per row against the KV cache, read in place
//
// Layouts: q [B, T, N, H] float32 (scores are q.k * scale, scale an attribute: H^-0.5); caches [L, R, S, K, H] (float32, or
// int8 with scales [L, R, S, K]); allowed [B, T, W]; out [B, T, N, H]. Query (b, t) of heads
// k*G .. k*G + G - 1 reads slots [0, W) of cache row first_row + b, head k, of layer `layer`.
// A work item is one (b, t, k) and a range of slots: the G query heads' scores, an online
// softmax (running max and sum, flash-decoding style) and the weighted values, all in float32;
// the ranges of one item are merged at the end. Small batches split the slots so both
// threads stream; each key and value vector is read once per item.

constexpr int64_t kSlotBlock = 16;

// Partial attention over slots [s0, s1): running max m [G], sum l [G] and unnormalised output
// acc [G, H]. Portable version (any G, H); the compiler vectorises the inner loops.
template <typename T>
void attend_range_plain(const float* q, float q_scale, int64_t G, int64_t H, const T* keys, const T* values,
                        const float* k_scale, const float* v_scale, int64_t slot_stride, int64_t scale_stride,
                        const bool* allowed, int64_t s0, int64_t s1, float* m, float* l, float* acc) {
  std::vector<float> p(G);
  for (int64_t g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.0f;
  std::fill(acc, acc + G * H, 0.0f);
  for (int64_t s = s0; s < s1; ++s) {
    if (!allowed[s]) continue;
    const T* key = keys + s * slot_stride;
    const T* value = values + s * slot_stride;
    const float ks = (k_scale ? k_scale[s * scale_stride] : 1.0f) * q_scale;
    const float vs = v_scale ? v_scale[s * scale_stride] : 1.0f;
    for (int64_t g = 0; g < G; ++g) {
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) dot += q[g * H + h] * static_cast<float>(key[h]);
      dot *= ks;
      const float m_new = std::max(m[g], dot);
      const float rescale = std::exp(m[g] - m_new);  // 0 for the first slot (m = -inf)
      const float w = std::exp(dot - m_new);
      l[g] = l[g] * rescale + w;
      m[g] = m_new;
      float* a = acc + g * H;
      for (int64_t h = 0; h < H; ++h) a[h] = a[h] * rescale + w * vs * static_cast<float>(value[h]);
    }
  }
}

#ifdef PRESS_SIMD
// exp(x) for x <= 0 (scores minus their running max): 2^(x log2 e) as 2^n * 2^f with a degree-6
// polynomial for 2^f on [-0.5, 0.5] (relative error under 2e-7); very negative x gives 0.
inline Simd::F exp_nonpositive(Simd::F x) {
  const Simd::F t = Simd::mul(Simd::max(x, Simd::set1(-87.0f)), Simd::set1(1.44269504088896341f));
  const Simd::F n = Simd::round(t);
  const Simd::F f = Simd::sub(t, n);
  Simd::F p = Simd::set1(1.535336188319500e-4f);
  p = Simd::fmadd(p, f, Simd::set1(1.339887440266574e-3f));
  p = Simd::fmadd(p, f, Simd::set1(9.618437357674640e-3f));
  p = Simd::fmadd(p, f, Simd::set1(5.550332471162809e-2f));
  p = Simd::fmadd(p, f, Simd::set1(2.402264791363012e-1f));
  p = Simd::fmadd(p, f, Simd::set1(6.931472028550421e-1f));
  p = Simd::fmadd(p, f, Simd::set1(1.0f));
  return Simd::scale_by_pow2(p, n);
}

// attend_range_plain for GB query heads of HC vectors of dimensions, the output accumulators in
// registers (and a key's vectors, where Simd holds them); slots go a vector's lanes at a time
// (scores, then one vectorised exp per head, then the values).
template <typename T, int HC, int GB>
void attend_range_simd(const float* q, float q_scale, int64_t H, const T* keys, const T* values, const float* k_scale,
                       const float* v_scale, int64_t slot_stride, int64_t scale_stride, const bool* allowed,
                       int64_t s0, int64_t s1, float* m_out, float* l_out, float* acc_out) {
  constexpr int64_t L = Simd::kLanes;
  Simd::F acc[GB][HC];
  float m[GB], l[GB];
  for (int g = 0; g < GB; ++g) {
    m[g] = -INFINITY, l[g] = 0.0f;
    for (int c = 0; c < HC; ++c) acc[g][c] = Simd::zero();
  }
  alignas(64) float prob[GB][L];
  for (int64_t b0 = s0; b0 < s1; b0 += L) {
    const int64_t n = std::min(L, s1 - b0);
    bool any = false;
    for (int64_t j = 0; j < L; ++j) {
      const int64_t s = b0 + j;
      if (j >= n || !allowed[s]) {
        for (int g = 0; g < GB; ++g) prob[g][j] = -INFINITY;
        continue;
      }
      any = true;
      const T* key = keys + s * slot_stride;
      const float ks = (k_scale ? k_scale[s * scale_stride] : 1.0f) * q_scale;
      Simd::F kv[HC];  // the key's vectors, held in registers where Simd has room (else loaded at each use)
      if constexpr (Simd::kHoldKeys)
        for (int c = 0; c < HC; ++c) kv[c] = Simd::load(key + L * c);
      for (int g = 0; g < GB; ++g) {
        Simd::F d = Simd::mul(Simd::load(q + g * H), Simd::kHoldKeys ? kv[0] : Simd::load(key));
        for (int c = 1; c < HC; ++c)
          d = Simd::fmadd(Simd::load(q + g * H + L * c), Simd::kHoldKeys ? kv[c] : Simd::load(key + L * c), d);
        prob[g][j] = Simd::sum(d) * ks;
      }
    }
    if (!any) continue;
    for (int g = 0; g < GB; ++g) {
      const Simd::F sv = Simd::load_aligned(prob[g]);
      const float m_new = std::max(m[g], Simd::max_lane(sv));
      const float rescale = std::exp(m[g] - m_new);  // 0 while nothing was seen (m = -inf)
      const Simd::F pv = Simd::zero_where_minus_inf(sv, exp_nonpositive(Simd::sub(sv, Simd::set1(m_new))));
      l[g] = l[g] * rescale + Simd::sum(pv);
      m[g] = m_new;
      Simd::store_aligned(prob[g], pv);
      const Simd::F r = Simd::set1(rescale);
      for (int c = 0; c < HC; ++c) acc[g][c] = Simd::mul(acc[g][c], r);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t s = b0 + j;
      if (!allowed[s]) continue;
      const T* value = values + s * slot_stride;
      const float vs = v_scale ? v_scale[s * scale_stride] : 1.0f;
      Simd::F vv[HC];
      if constexpr (Simd::kHoldKeys)
        for (int c = 0; c < HC; ++c) vv[c] = Simd::load(value + L * c);
      for (int g = 0; g < GB; ++g) {
        const Simd::F w = Simd::set1(prob[g][j] * vs);
        for (int c = 0; c < HC; ++c)
          acc[g][c] = Simd::fmadd(w, Simd::kHoldKeys ? vv[c] : Simd::load(value + L * c), acc[g][c]);
      }
    }
  }
  for (int g = 0; g < GB; ++g) {
    m_out[g] = m[g], l_out[g] = l[g];
    for (int c = 0; c < HC; ++c) Simd::store(acc_out + g * H + L * c, acc[g][c]);
  }
}

// The G heads of one item in groups whose accumulators fit the registers (Simd::heads_per_pass).
template <typename T, int HC>
void attend_heads_simd(const float* q, float q_scale, int64_t G, const T* keys, const T* values, const float* k_scale,
                       const float* v_scale, int64_t slot_stride, int64_t scale_stride, const bool* allowed,
                       int64_t s0, int64_t s1, float* m, float* l, float* acc) {
  constexpr int64_t kGroup = Simd::heads_per_pass(HC), H = Simd::kLanes * HC;
  for (int64_t g = 0; g < G;) {
    const int64_t left = std::min<int64_t>(kGroup, G - g);
    auto run = [&](auto gb) {
      attend_range_simd<T, HC, decltype(gb)::value>(q + g * H, q_scale, H, keys, values, k_scale, v_scale, slot_stride,
                                                    scale_stride, allowed, s0, s1, m + g, l + g, acc + g * H);
    };
    if (left == 4) run(std::integral_constant<int, 4>{});
    else if (left == 3) run(std::integral_constant<int, 3>{});
    else if (left == 2) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
    g += left;
  }
}
#endif

template <typename T>
void attend_range(const float* q, float q_scale, int64_t G, int64_t H, const T* keys, const T* values, const float* k_scale,
                  const float* v_scale, int64_t slot_stride, int64_t scale_stride, const bool* allowed, int64_t s0,
                  int64_t s1, float* m, float* l, float* acc) {
#ifdef PRESS_SIMD
  auto simd = [&](auto hc) {
    attend_heads_simd<T, decltype(hc)::value>(q, q_scale, G, keys, values, k_scale, v_scale, slot_stride, scale_stride,
                                              allowed, s0, s1, m, l, acc);
  };
  constexpr int L = Simd::kLanes;  // head sizes of 16, 32, 64, 80, 96 and 128 dimensions
  switch (H) {
    case 16: return simd(std::integral_constant<int, 16 / L>{});
    case 32: return simd(std::integral_constant<int, 32 / L>{});
    case 64: return simd(std::integral_constant<int, 64 / L>{});
    case 80: return simd(std::integral_constant<int, 80 / L>{});
    case 96: return simd(std::integral_constant<int, 96 / L>{});
    case 128: return simd(std::integral_constant<int, 128 / L>{});
    default: break;
  }
#endif
  attend_range_plain<T>(q, q_scale, G, H, keys, values, k_scale, v_scale, slot_stride, scale_stride, allowed, s0, s1, m, l, acc);
}

template <typename T>
ffi::Error Attention(ffi::Buffer<ffi::F32>& q, const T* keys, const T* values,
                     const float* k_scale, const float* v_scale, ffi::Span<const int64_t> cache_dims,
                     ffi::Buffer<ffi::PRED>& allowed, ffi::Buffer<ffi::S32>& layer, ffi::Buffer<ffi::S32>& first_row,
                     ffi::ResultBuffer<ffi::F32>& out, int64_t threads_requested, float q_scale) {
  auto qd = q.dimensions();
  auto ad = allowed.dimensions();
  if (qd.size() != 4 || cache_dims.size() != 5 || ad.size() != 3)
    return ffi::Error::InvalidArgument("press attention kernel: q [B, T, N, H], caches [L, R, S, K, H], allowed [B, T, W]");
  const int64_t B = qd[0], T_ = qd[1], N = qd[2], H = qd[3];
  const int64_t L = cache_dims[0], R = cache_dims[1], S = cache_dims[2], K = cache_dims[3], W = ad[2];
  if (cache_dims[4] != H || N % K || W < 1 || W > S || ad[0] != B || ad[1] != T_)
    return ffi::Error::InvalidArgument("press attention kernel: shapes do not match");
  if (B > R) return ffi::Error::InvalidArgument("press attention kernel: more query rows than cache rows");
  // Out-of-range starts are clamped, as lax.dynamic_slice clamps them on the plain path (a
  // padding chunk's row may be one past the last).
  const int64_t l = std::clamp<int64_t>(*layer.typed_data(), 0, L - 1);
  const int64_t r0 = std::clamp<int64_t>(*first_row.typed_data(), 0, R - B);
  const int64_t G = N / K, items = B * T_ * K;
  const int64_t bytes = items * W * H * 2 * static_cast<int64_t>(sizeof(T));
  const int64_t threads = thread_count(threads_requested, bytes, 1);  // one below PRESS_MIN_SPLIT_BYTES
  // Fewer items than two per thread: split each item's slots (blocks of at least 64) as well.
  const int64_t most_splits = std::max<int64_t>(1, W / 64);
  const int64_t splits = std::min(most_splits, std::max<int64_t>(1, (2 * threads + items - 1) / items));
  const int64_t units = items * splits;
  std::vector<float> m(units * G), sums(units * G), acc(units * G * H);
  const float* qp = q.typed_data();
  const bool* ap = allowed.typed_data();
  float *mp = m.data(), *lp = sums.data(), *accp = acc.data();
  auto unit_slots = [=](int64_t split) { return (W / kSlotBlock * split / splits) * kSlotBlock; };
  parallel_stripes(threads, threads, [=](int64_t part) {
    for (int64_t u = units * part / threads; u < units * (part + 1) / threads; ++u) {
      const int64_t item = u / splits, split = u % splits;
      const int64_t b = item / (T_ * K), t = (item / K) % T_, k = item % K;
      const int64_t row = (l * R + r0 + b) * S;  // slot 0 of this layer's row, counted in slots
      const int64_t at = (row * K + k) * H;    // element offset of slot 0, head k
      const int64_t s1 = split + 1 == splits ? W : unit_slots(split + 1);
      attend_range<T>(qp + ((b * T_ + t) * N + k * G) * H, q_scale, G, H, keys + at, values + at,
                      k_scale ? k_scale + row * K + k : nullptr, v_scale ? v_scale + row * K + k : nullptr, K * H, K,
                      ap + (b * T_ + t) * W, unit_slots(split), s1, mp + u * G, lp + u * G, accp + u * G * H);
    }
  });
  // Merge each item's ranges: rescale each to the largest max, add, divide by the total weight.
  float* op = out->typed_data();
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / (T_ * K), t = (item / K) % T_, k = item % K;
    for (int64_t g = 0; g < G; ++g) {
      float* o = op + ((b * T_ + t) * N + k * G + g) * H;
      float top = -INFINITY;
      for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, mp[(item * splits + sp) * G + g]);
      std::fill(o, o + H, 0.0f);
      if (top == -INFINITY) {  // a query that may see no slot (padding): the mean of the values, as the plain path
        const int64_t row = (l * R + r0 + b) * S;
        for (int64_t s = 0; s < W; ++s) {
          const T* value = values + ((row + s) * K + k) * H;
          const float vs = v_scale ? v_scale[(row + s) * K + k] / static_cast<float>(W) : 1.0f / static_cast<float>(W);
          for (int64_t h = 0; h < H; ++h) o[h] += static_cast<float>(value[h]) * vs;
        }
        continue;
      }
      float total = 0.0f;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t u = item * splits + sp;
        const float w = std::exp(mp[u * G + g] - top);  // 0 for a range that saw nothing
        total += lp[u * G + g] * w;
        const float* a = accp + (u * G + g) * H;
        for (int64_t h = 0; h < H; ++h) o[h] += a[h] * w;
      }
      for (int64_t h = 0; h < H; ++h) o[h] /= total;
    }
  }
  return ffi::Error::Success();
}

ffi::Error AttentionF32(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                        ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::S32> layer,
                        ffi::Buffer<ffi::S32> first_row, ffi::ResultBuffer<ffi::F32> out, int64_t threads,
                        float scale) {
  return Attention<float>(q, keys.typed_data(), values.typed_data(), nullptr, nullptr, keys.dimensions(),
                          allowed, layer, first_row, out, threads, scale);
}

ffi::Error AttentionS8(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> keys,
                       ffi::Buffer<ffi::S8> values, ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                       ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> first_row,
                       ffi::ResultBuffer<ffi::F32> out, int64_t threads, float scale) {
  return Attention<int8_t>(q, keys.typed_data(), values.typed_data(), k_scale.typed_data(),
                           v_scale.typed_data(), keys.dimensions(), allowed, layer, first_row, out, threads, scale);
}

// ---- argmax over the last axis (greedy sampling): x [B, V] float32 -> [B] int32, the lowest
// index among ties and the first NaN where a row has one (jnp.argmax's answer). XLA's CPU
// backend spent 70-230 us on a row of SmolLM2's 49,152 logits (its variadic reduce runs as a
// scalar loop, and even a plain max took ~70 us through its reduction fusion); two vector
// passes over the row, the second stopping at the first hit, take a few (benchmarks/argmax.py).

int32_t first_nan(const float* x, int64_t V) {
  for (int64_t i = 0; i < V; ++i)
    if (std::isnan(x[i])) return static_cast<int32_t>(i);
  return -1;
}

int32_t argmax_row(const float* x, int64_t V) {
  int64_t i = 0;
  float best = -INFINITY;
  bool nan = false;
#ifdef PRESS_SIMD
  constexpr int L = Simd::kLanes;
  Simd::F top = Simd::set1(-INFINITY);
  Simd::Mask unordered = 0;
  for (; i + L <= V; i += L) {
    const Simd::F v = Simd::load(x + i);
    unordered |= Simd::nan_lanes(v);
    top = Simd::max(top, v);
  }
  nan = unordered != 0;
  best = Simd::max_lane(top);
#endif
  for (int64_t j = i; j < V; ++j) {
    nan |= std::isnan(x[j]);
    best = std::max(best, x[j]);
  }
  if (nan) return first_nan(x, V);
  i = 0;
#ifdef PRESS_SIMD
  const Simd::F target = Simd::set1(best);
  for (; i + L <= V; i += L)
    if (const Simd::Mask hit = Simd::equal_lanes(Simd::load(x + i), target))
      return static_cast<int32_t>(i + __builtin_ctz(hit));
#endif
  for (; i < V; ++i)
    if (x[i] == best) return static_cast<int32_t>(i);
  return 0;  // not reached: the row holds its own maximum (V >= 1 is checked by the caller)
}

ffi::Error Argmax(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out, int64_t threads) {
  auto dims = x.dimensions();
  if (dims.size() != 2 || dims[1] < 1 || dims[1] > INT32_MAX)
    return ffi::Error::InvalidArgument("press argmax: logits must be [rows, V] with 1 <= V < 2**31");
  const int64_t B = dims[0], V = dims[1];
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  parallel_stripes(B, thread_count(threads, B * V * int64_t(sizeof(float)), 1),
                   [=](int64_t row) { op[row] = argmax_row(xp + row * V, V); });
  return ffi::Error::Success();
}

}  // namespace

// The bindings: x, the stacked weights (and their scales, the layer) first; the matmuls that
// prefetch then take the next call's weights and layer; attention's end with the mask, the
// layer and the first row.
namespace {
using F32 = ffi::Buffer<ffi::F32>;
using S8 = ffi::Buffer<ffi::S8>;
using S32 = ffi::Buffer<ffi::S32>;

auto bind_int8_weights() { return ffi::Ffi::Bind().Arg<F32>().Arg<S8>().Arg<F32>().Arg<S32>(); }

template <typename Binding>
auto bind_attention_end(Binding binding) {
  return std::move(binding).template Arg<ffi::Buffer<ffi::PRED>>().template Arg<S32>().template Arg<S32>()
      .template Ret<F32>().template Attr<int64_t>("threads").template Attr<float>("scale");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_int8_matmul, Int8Matmul,
                              bind_int8_weights().Arg<S8>().Arg<S32>().Ret<F32>().Attr<int64_t>("threads")
                                  .Attr<bool>("tiled"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_f32_matmul, F32Matmul,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<S32>().Arg<F32>().Arg<S32>().Ret<F32>()
                                  .Attr<int64_t>("threads").Attr<bool>("tiled"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_bf16_matmul, Bf16Matmul,
                              ffi::Ffi::Bind().Arg<F32>().Arg<ffi::Buffer<ffi::BF16>>().Arg<S32>()
                                  .Arg<ffi::Buffer<ffi::BF16>>().Arg<S32>().Ret<F32>().Attr<int64_t>("threads")
                                  .Attr<bool>("tiled"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_int4_matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<S8>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<S32>()
                                  .Arg<S8>()
                                  .Arg<S32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("zero_point")
                                  .Attr<bool>("has_offset")
                                  .Attr<bool>("tiled"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_argmax, Argmax,
                              ffi::Ffi::Bind().Arg<F32>().Ret<ffi::Buffer<ffi::S32>>().Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_attention_f32, AttentionF32,
                              bind_attention_end(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(press_attention_s8, AttentionS8,
                              bind_attention_end(ffi::Ffi::Bind().Arg<F32>().Arg<S8>().Arg<S8>().Arg<F32>().Arg<F32>()));

#ifdef PRESS_VNNI
XLA_FFI_DEFINE_HANDLER_SYMBOL(press_w8a8_matmul, W8A8Matmul, bind_int8_weights().Ret<F32>().Attr<int64_t>("threads"));
#endif

#ifdef PRESS_SIMD
XLA_FFI_DEFINE_HANDLER_SYMBOL(press_w4a8_matmul, W4A8Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<S8>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<S32>()
                                  .Arg<S8>()
                                  .Arg<S32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("zero_point")
                                  .Attr<bool>("has_offset"));
#endif

#ifdef PRESS_W8A8G
XLA_FFI_DEFINE_HANDLER_SYMBOL(press_w8a8g_matmul, W8A8GMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<S8>()
                                  .Arg<F32>()
                                  .Arg<S32>()
                                  .Arg<S8>()
                                  .Arg<S32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("group"));
#endif

// Whether this build has the w8a8-gN kernel (AVX2, or AVX-512 with VNNI), for the Python side.
extern "C" int press_cpu_kernels_w8a8g() {
#ifdef PRESS_W8A8G
  return 1;
#else
  return 0;
#endif
}

// Whether this build has the w4a8 kernel (AVX-512 or AVX2: its integer products), for the Python side.
extern "C" int press_cpu_kernels_w4a8() {
#ifdef PRESS_SIMD
  return 1;
#else
  return 0;
#endif
}

// Whether this build has the w8a8 kernel (the CPU has AVX-512 VNNI), for the Python side.
extern "C" int press_cpu_kernels_vnni() {
#ifdef PRESS_VNNI
  return 1;
#else
  return 0;
#endif
}

// The workers, outside XLA, for tests: runs `parts` parts on up to `threads` threads (the caller
// and workers), part p adding p + 1 to a total after `spin` iterations of busy work, and returns
// the total (parts (parts + 1) / 2 when every part ran exactly once).
extern "C" int64_t press_workers_selftest(int64_t parts, int64_t threads, int64_t spin) {
  std::atomic<int64_t> total{0};
  parallel_stripes(parts, threads, [&](int64_t p) {
    volatile int64_t busy = 0;
    for (int64_t i = 0; i < spin; ++i) busy = busy + i;
    total.fetch_add(p + 1);
  });
  return total.load();
}

// The workers the kernels share calls with (one per CPU this process may use, less the caller).
extern "C" int64_t press_kernel_workers() { return workers().size(); }

// Which code path this build has (1: AVX-512, 0: plain C++), for the Python side to report.
extern "C" int press_cpu_kernels_avx512() {
#ifdef PRESS_AVX512
  return 1;
#else
  return 0;
#endif
}

// Whether this build has the AVX2 loops (a CPU with AVX2, FMA and F16C but not AVX-512).
extern "C" int press_cpu_kernels_avx2() {
#ifdef PRESS_AVX2
  return 1;
#else
  return 0;
#endif
}
