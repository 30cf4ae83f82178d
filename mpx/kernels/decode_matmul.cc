// A skinny matmul for decode on CPU that reads each weight in its stored width.
//
//   y[m, n] = sum_k x[m, k] * w[k, n] * scale[k / block_rows, n / block_cols]
//
// x is (M, K) float32 with a few rows (one per sequence being decoded); the weight is
// stored as E4M3FN or E5M2 bytes, bf16 or float32, with one float32 scale per block
// (a whole tensor, a column or a 128 x 128 tile: the scale array's shape says which).
// With `transposed` the weight is stored (N, K) (a tied LM head: the embedding) and
// its blocks are over its own axes.
//
// Decode is memory-bound: every token reads every weight once. XLA's CPU backend
// dequantizes an FP8 or bf16 weight into a float32 copy before its dot, so a token
// reads 4 bytes per weight whatever the format. Here each weight is decoded in
// registers as it streams from memory, so a token reads 1 byte per FP8 weight and 2
// per bf16 one, and every row of x reuses the decoded vector.
//
// Decoding is exact (normal, subnormal, zero, infinity, NaN): E5M2 bytes are the high
// byte of an IEEE half, E4M3FN bytes are moved into a half's fields (the exponent
// bias, 15 - 7, goes into the scale as a factor of 256; its NaN is patched), and the
// hardware converts halves to float32 (F16C), subnormals included whatever the
// thread's denormal mode; bf16 is the high half of a float32. A scale is constant on
// its block, so products are summed over a block's rows (K in order, four at a time)
// and the sum is multiplied by the block's scale once, as a block-scaled FP8 GEMM
// promotes its partial sums (DeepSeek-V3 report, 3.3). Results differ from
// dequantize-then-dot by float32 rounding only, and do not depend on the number of
// threads: every output is summed by one thread in a fixed order.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class Kind { kE4M3, kE5M2, kBF16, kF32 };

constexpr int64_t kLanes = 8;        // floats in a 256-bit vector
constexpr int64_t kBand = 256;       // columns a task sums at a time (M x 256 floats in L1)

// The factor between a stored element as Load8 decodes it and its value.
template <Kind kind>
constexpr float kFactor = kind == Kind::kE4M3 ? 256.0f : 1.0f;

inline float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// E4M3FN bytes (one per 16-bit lane) as IEEE halves of value / 256: the byte moved to
// the high half and shifted right arithmetically puts the sign at bit 15 and the
// exponent and mantissa at bits 7-13; bit 14 (a copy of the sign) is cleared, and
// S.1111.111 (NaN) gets bit 14 back, which makes it a half NaN.
template <typename V, V (*Slli)(V, int), V (*Srai)(V, int), V (*And)(V, V), V (*Or)(V, V), V (*Eq)(V, V),
          V (*Set)(short)>
inline V E4M3AsHalves(V bytes) {
  const V half = And(Srai(Slli(bytes, 8), 1), Set(static_cast<short>(0xbfff)));
  const V nan = And(Eq(And(half, Set(0x7fff)), Set(0x3f80)), Set(0x4000));
  return Or(half, nan);
}

inline __m128i Slli128(__m128i v, int n) { return _mm_slli_epi16(v, n); }
inline __m128i Srai128(__m128i v, int n) { return _mm_srai_epi16(v, n); }
inline __m256i Slli256(__m256i v, int n) { return _mm256_slli_epi16(v, n); }
inline __m256i Srai256(__m256i v, int n) { return _mm256_srai_epi16(v, n); }

inline __m128i E4M3AsHalf8(__m128i bytes) {
  return E4M3AsHalves<__m128i, Slli128, Srai128, _mm_and_si128, _mm_or_si128, _mm_cmpeq_epi16, _mm_set1_epi16>(bytes);
}

inline __m256i E4M3AsHalf16(__m256i bytes) {
  return E4M3AsHalves<__m256i, Slli256, Srai256, _mm256_and_si256, _mm256_or_si256, _mm256_cmpeq_epi16,
                      _mm256_set1_epi16>(bytes);
}

// 8 consecutive stored elements from `p` as float32 (times 1 / kFactor<kind>).
template <Kind kind>
inline __m256 Load8(const void* p) {
  if constexpr (kind == Kind::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else if constexpr (kind == Kind::kBF16) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else {
    const __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
    if constexpr (kind == Kind::kE5M2) return _mm256_cvtph_ps(_mm_slli_epi16(bytes, 8));
    return _mm256_cvtph_ps(E4M3AsHalf8(bytes));
  }
}

// 16 consecutive stored elements as two vectors of 8 (FP8: one 16-lane decode).
template <Kind kind>
inline void Load16(const void* p, __m256& lo, __m256& hi) {
  if constexpr (kind == Kind::kE4M3 || kind == Kind::kE5M2) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    const __m256i halves = kind == Kind::kE5M2 ? _mm256_slli_epi16(bytes, 8) : E4M3AsHalf16(bytes);
    lo = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
    hi = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
  } else {
    lo = Load8<kind>(p);
    hi = Load8<kind>(static_cast<const uint8_t*>(p) + 8 * (kind == Kind::kF32 ? 4 : 2));
  }
}

// One stored element as float32 (times 1 / kFactor<kind>): the tails of Load8.
template <Kind kind>
inline float Load1(const void* p) {
  if constexpr (kind == Kind::kF32) {
    return *static_cast<const float*>(p);
  } else if constexpr (kind == Kind::kBF16) {
    return FromBits(static_cast<uint32_t>(*static_cast<const uint16_t*>(p)) << 16);
  } else {
    const uint8_t byte = *static_cast<const uint8_t*>(p);
    const __m128i bytes16 = _mm_set1_epi16(byte);
    return _mm_cvtss_f32(_mm_cvtph_ps(kind == Kind::kE5M2 ? _mm_slli_epi16(bytes16, 8) : E4M3AsHalf8(bytes16)));
  }
}

template <Kind kind>
constexpr int64_t kItem = kind == Kind::kF32 ? 4 : kind == Kind::kBF16 ? 2 : 1;

struct Weight {
  const uint8_t* data;
  int64_t rows, cols;          // stored shape
  const float* scale;          // (ceil(rows / block_rows), ceil(cols / block_cols))
  int64_t block_rows, block_cols, scale_cols;

  template <Kind kind>
  const void* At(int64_t row, int64_t col) const { return data + (row * cols + col) * kItem<kind>; }
};

inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// part[m][j] += x[m, k] * w[k, n0 + j] for rows k in `ks` (count of them) and j in
// [j0, j0 + 16): the weight rows decoded once, every row of x multiplied.
template <Kind kind, int count>
inline void Sum16(const float* x, int64_t rows, int64_t k_total, const Weight& w, int64_t k, int64_t n,
                  float* part) {
  __m256 lo[count], hi[count];
  for (int r = 0; r < count; ++r) Load16<kind>(w.At<kind>(k + r, n), lo[r], hi[r]);
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * k_total + k;
    float* pm = part + m * kBand;
    __m256 a = _mm256_loadu_ps(pm), b = _mm256_loadu_ps(pm + kLanes);
    for (int r = 0; r < count; ++r) {
      const __m256 xs = _mm256_broadcast_ss(xm + r);
      a = _mm256_fmadd_ps(xs, lo[r], a);
      b = _mm256_fmadd_ps(xs, hi[r], b);
    }
    _mm256_storeu_ps(pm, a);
    _mm256_storeu_ps(pm + kLanes, b);
  }
}

// part[m][j] += sum over rows [k0, k1) of x[m, k] * w[k, n0 + j] for j < width
// (part holds kBand floats a row).
template <Kind kind>
void SumRows(const float* x, int64_t rows, const Weight& w, int64_t k0, int64_t k1, int64_t n0,
             int64_t width, float* part) {
  const int64_t k_total = w.rows, whole = width / 16 * 16;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4)
    for (int64_t j = 0; j < whole; j += 16) Sum16<kind, 4>(x, rows, k_total, w, k, n0 + j, part + j);
  for (; k < k1; ++k)
    for (int64_t j = 0; j < whole; j += 16) Sum16<kind, 1>(x, rows, k_total, w, k, n0 + j, part + j);
  for (int64_t kk = k0; kk < k1; ++kk)
    for (int64_t j = whole; j < width; ++j)
      for (int64_t m = 0; m < rows; ++m)
        part[m * kBand + j] += x[m * k_total + kk] * Load1<kind>(w.At<kind>(kk, n0 + j));
}

// Columns [n0, n0 + width) of y for a weight stored (K, N), width <= kBand.
template <Kind kind>
void ColumnBand(const float* x, int64_t rows, const Weight& w, int64_t n0, int64_t width, float* y) {
  const int64_t n_total = w.cols;
  std::vector<float> acc(rows * kBand, 0.0f), part(rows * kBand), scales(width);
  for (int64_t k0 = 0; k0 < w.rows; k0 += w.block_rows) {
    std::fill(part.begin(), part.end(), 0.0f);
    SumRows<kind>(x, rows, w, k0, std::min(k0 + w.block_rows, w.rows), n0, width, part.data());
    const float* srow = w.scale + (k0 / w.block_rows) * w.scale_cols;
    for (int64_t j = 0; j < width; ++j) scales[j] = srow[(n0 + j) / w.block_cols] * kFactor<kind>;
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t j = 0; j < width; ++j) acc[m * kBand + j] += part[m * kBand + j] * scales[j];
  }
  for (int64_t m = 0; m < rows; ++m) std::memcpy(y + m * n_total + n0, &acc[m * kBand], width * sizeof(float));
}

// Output columns [n0, n1) of y for a weight stored (N, K): dot products of weight rows
// with every row of x. Four weight rows at a time are decoded into an L1 buffer, one
// chunk of K (inside one scale block) at a time, and every row of x is multiplied by
// them from there.
constexpr int64_t kGroup = 4;     // weight rows decoded together
constexpr int64_t kChunk = 256;   // K elements of a chunk

template <Kind kind>
void RowBand(const float* x, int64_t rows, const Weight& w, int64_t n0, int64_t n1, float* y) {
  const int64_t n_total = w.rows, k_total = w.cols;
  alignas(32) float buf[kGroup][kChunk];
  std::vector<float> total(rows * kGroup);
  for (int64_t n = n0; n < n1; n += kGroup) {
    const int64_t group = std::min(kGroup, n1 - n);
    std::fill(total.begin(), total.end(), 0.0f);
    for (int64_t k0 = 0; k0 < k_total;) {
      const int64_t block_end = std::min(k_total, (k0 / w.block_cols + 1) * w.block_cols);
      const int64_t len = std::min(kChunk, block_end - k0), whole = len / kLanes * kLanes;
      for (int64_t r = 0; r < kGroup; ++r) {
        const int64_t row = n + std::min(r, group - 1);  // spare rows repeat the last
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) {
          __m256 lo, hi;
          Load16<kind>(w.At<kind>(row, k0 + j), lo, hi);
          _mm256_store_ps(buf[r] + j, lo);
          _mm256_store_ps(buf[r] + j + kLanes, hi);
        }
        for (; j < len; ++j) buf[r][j] = Load1<kind>(w.At<kind>(row, k0 + j));
      }
      for (int64_t m = 0; m < rows; ++m) {
        const float* xm = x + m * k_total + k0;
        __m256 acc[kGroup] = {};
        for (int64_t j = 0; j < whole; j += kLanes) {
          const __m256 xv = _mm256_loadu_ps(xm + j);
          for (int64_t r = 0; r < kGroup; ++r) acc[r] = _mm256_fmadd_ps(xv, _mm256_load_ps(buf[r] + j), acc[r]);
        }
        for (int64_t r = 0; r < group; ++r) {
          float sum = Sum8(acc[r]);
          for (int64_t j = whole; j < len; ++j) sum += xm[j] * buf[r][j];
          const float scale = w.scale[((n + r) / w.block_rows) * w.scale_cols + k0 / w.block_cols];
          total[m * kGroup + r] += sum * (scale * kFactor<kind>);
        }
      }
      k0 += len;
    }
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t r = 0; r < group; ++r) y[m * n_total + n + r] = total[m * kGroup + r];
  }
}

// Helper threads of this library, one fewer than the machine's cores, shared by all
// calls. Decode runs a few hundred products a token, each some tens of microseconds:
// waking a sleeping thread (XLA's pool) costs about as much as the product, so a
// helper spins briefly (kSpin) for the next product before it sleeps. A call that
// finds the helpers busy (XLA running two products at once) runs on its own thread.
class Helpers {
 public:
  static Helpers& Get() {
    static Helpers* helpers = new Helpers(std::max(1u, std::thread::hardware_concurrency()) - 1);
    return *helpers;
  }

  int64_t size() const { return static_cast<int64_t>(threads_.size()); }

  // task(i) for i in [0, count), on the caller and the helpers; returns when all ran.
  void Run(int64_t count, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || threads_.empty() || count < 2) {
      for (int64_t i = 0; i < count; ++i) task(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &task;
      count_ = count;
      csr_ = _mm_getcsr();
      next_.store(0);
      done_.store(0);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    Work();
    while (done_.load(std::memory_order_acquire) < count) _mm_pause();
    // Every helper has left this generation's tasks before the next can start.
    while (active_.load(std::memory_order_acquire) > 0) _mm_pause();
  }

 private:
  static constexpr int kSpin = 4000;  // pauses before a helper sleeps (~100 us: 26 ns a pause on Zen 3)

  explicit Helpers(unsigned n) {
    for (unsigned i = 0; i < n; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  void Work() {
    for (int64_t i; (i = next_.fetch_add(1)) < count_;) {
      (*task_)(i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < kSpin && generation_.load(std::memory_order_acquire) == seen; ++spin) _mm_pause();
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
      }
      std::unique_lock<std::mutex> lock(mu_);
      seen = generation_.load();
      active_.fetch_add(1);
      _mm_setcsr(csr_);  // the caller's denormal mode (XLA's treats them as zero): the same bits on any thread
      lock.unlock();
      Work();
      active_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_, mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0}, done_{0}, active_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t count_ = 0;
  unsigned csr_ = 0;
};

// y = x . w for one element kind, split into tasks of whole column bands. A product
// smaller than kMinParallel weights runs on the caller alone: waking a helper costs
// more than it saves.
constexpr int64_t kMinParallel = 1 << 18;

template <Kind kind>
void Multiply(const float* x, int64_t rows, const Weight& w, bool transposed, float* y) {
  const int64_t n = transposed ? w.rows : w.cols;
  Helpers& helpers = Helpers::Get();
  const int64_t threads = w.rows * w.cols < kMinParallel ? 1 : helpers.size() + 1;
  // Two tasks a thread even out their ends; bands of whole 64-column groups (a cache
  // line of FP8 weights), wide enough to stream.
  const int64_t tasks = std::max<int64_t>(1, std::min((n + 63) / 64, 2 * threads));
  const int64_t per = ((n + tasks - 1) / tasks + 63) / 64 * 64;
  const std::function<void(int64_t)> task = [=](int64_t t) {
    const int64_t lo = t * per, hi = std::min(n, lo + per);
    if (transposed) return RowBand<kind>(x, rows, w, lo, hi, y);
    for (int64_t c = lo; c < hi; c += kBand) ColumnBand<kind>(x, rows, w, c, std::min(kBand, hi - c), y);
  };
  const int64_t count = (n + per - 1) / per;
  if (threads == 1) {
    for (int64_t t = 0; t < count; ++t) task(t);
  } else {
    helpers.Run(count, task);
  }
}

ffi::Error DecodeMatmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                        int64_t block_rows, int64_t block_cols, int64_t transposed) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("decode_matmul: x, w and scale must be 2-D");
  const int64_t rows = xd[0], k = xd[1];
  if ((transposed ? wd[1] : wd[0]) != k || block_rows < 1 || block_cols < 1 ||
      sd[0] != (wd[0] + block_rows - 1) / block_rows || sd[1] != (wd[1] + block_cols - 1) / block_cols)
    return ffi::Error::InvalidArgument("decode_matmul: shapes of x, w and scale do not fit");
  const Weight weight{static_cast<const uint8_t*>(w.untyped_data()), wd[0], wd[1], scale.typed_data(),
                      block_rows, block_cols, sd[1]};
  const float* xs = x.typed_data();
  float* out = y->typed_data();
  switch (w.element_type()) {
    case ffi::DataType::F8E4M3FN: Multiply<Kind::kE4M3>(xs, rows, weight, transposed, out); break;
    case ffi::DataType::F8E5M2: Multiply<Kind::kE5M2>(xs, rows, weight, transposed, out); break;
    case ffi::DataType::BF16: Multiply<Kind::kBF16>(xs, rows, weight, transposed, out); break;
    case ffi::DataType::F32: Multiply<Kind::kF32>(xs, rows, weight, transposed, out); break;
    default: return ffi::Error::InvalidArgument("decode_matmul: w must be f8e4m3fn, f8e5m2, bf16 or f32");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MpxDecodeMatmul, DecodeMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("block_cols")
                                  .Attr<int64_t>("transposed"));
