// Grouped GEMM for few rows per group, on a CPU: y_e = x_e · W_e for every expert e at once.
//
// Rows are sorted by expert: expert e owns rows [o_e, o_e + m_e) of x ([N, p]); W is [n, p, q].
// Three products, each parallel over (expert, block of output columns) with OpenMP:
//   forward      y[o_e + r, j] = Σ_i x[o_e + r, i] · W[e, i, j]
//   input grad   dx[o_e + r, i] = Σ_j dy[o_e + r, j] · W[e, i, j]       (dY_e · W_eᵀ)
//   weight grad  dW[e, i, j]   = Σ_r x[o_e + r, i] · dy[o_e + r, j]     (X_eᵀ · dY_e; 0 if m_e = 0)
// The weights are read in place (no packing) and each W_e once per tile of up to 6 rows, so with
// few rows per expert the products run at the speed the weights stream from memory (software
// prefetches into L2 ahead of the reads; the weight gradient, written once, with non-temporal
// stores that skip reading its lines first). Register
// tiles of 6 × 16 accumulators (two AVX2 vectors per row) for the forward and the weight
// gradient, 4 rows × 3 weight rows of 8-lane dot products for the input gradient. float32 and
// bfloat16 accumulate in float32, float64 in float64. Plain C ABI, called through ctypes.

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

struct bf16 {
  uint16_t bits;
};

inline float to_acc(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

template <typename T, typename A>
inline T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
inline bf16 from_acc<bf16, float>(float v) {  // round to nearest even, NaN kept a NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// One 32-byte vector of accumulators (GCC/Clang vector extensions: AVX2 registers with
// -march=native on such a CPU, pairs of SSE registers elsewhere).
template <typename A> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

template <typename T>
inline typename Vec<typename Acc<T>::type>::type load(const T* p) {
  typename Vec<typename Acc<T>::type>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <>
inline Vec<float>::type load<bf16>(const bf16* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  const u32x8 u = __builtin_convertvector(h, u32x8) << 16;
  Vec<float>::type v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

template <typename T, typename V>
inline void store(T* p, const V& v, int64_t count) {
  for (int64_t l = 0; l < count; ++l) p[l] = from_acc<T>(v[l]);
}

// A full vector stored past the caches (a non-temporal store) where the CPU has one and `p` is
// aligned for it: a weight gradient larger than the caches is written once and read only by the
// optimiser later, so fetching its lines into the cache before overwriting them (what a plain
// store does) would double the memory traffic of the few-row weight gradient, which is nothing
// but that write. The caller streams only such gradients (smoe_weight_grad's `stream`).
template <typename T, typename V>
inline void stream(T* p, const V& v) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, reinterpret_cast<const __m256&>(v));
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_pd(p, reinterpret_cast<const __m256d&>(v));
      return;
    }
  }
#endif
  store(p, v, Vec<typename Acc<T>::type>::lanes);
}

constexpr int MR = 6;              // rows of C per register tile
constexpr int NV = 2;              // vectors of C columns per register tile
// Rows of B (a weight) ahead that the products ask the L2 cache for. With a few rows per expert
// they stream the weights from memory, and a tile reads one line per weight row or three rows
// side by side, patterns the hardware prefetchers follow too slowly to keep enough lines in
// flight.
constexpr int64_t PREFETCH = 64;

// C[R, cols] = A[R, K] · B[K, cols], A(r, k) = a[r·sar + k·sak], B row-major (ldb), C (ldc),
// cols ≤ NV vectors; full tiles of C are written with `stream` if Stream. The next column
// strip's line of each row is prefetched, and on a tile's first strip the rows PREFETCH ahead.
template <typename T, int R, bool Stream>
inline void tile_ab(const T* a, int64_t sar, int64_t sak, const T* b, int64_t ldb, T* c,
                    int64_t ldc, int64_t K, int64_t cols, bool first) {
  using A = typename Acc<T>::type;
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes;
  V acc[R][NV] = {};
  if (cols == NV * L) {
    for (int64_t k = 0; k < K; ++k) {
      const T* brow = b + k * ldb;
      __builtin_prefetch(brow + NV * L, 0, 2);
      if (first) __builtin_prefetch(brow + PREFETCH * ldb, 0, 2);
      V bv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) bv[v] = load(brow + v * L);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const A av = to_acc(a[r * sar + k * sak]);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) {
        if constexpr (Stream) stream(c + r * ldc + v * L, acc[r][v]);
        else store(c + r * ldc + v * L, acc[r][v], L);
      }
    return;
  }
  A rest[R][NV * L] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const A av = to_acc(a[r * sar + k * sak]);
      for (int64_t j = 0; j < cols; ++j) rest[r][j] += av * to_acc(b[k * ldb + j]);
    }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < cols; ++j) c[r * ldc + j] = from_acc<T>(rest[r][j]);
}

template <typename T, bool Stream = false>
void gemm_ab(const T* a, int64_t sar, int64_t sak, const T* b, int64_t ldb, T* c, int64_t ldc,
             int64_t M, int64_t K, int64_t j0, int64_t j1) {
  constexpr int64_t W = NV * Vec<typename Acc<T>::type>::lanes;
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t rows = M - m0 < MR ? M - m0 : MR;
    const T* at = a + m0 * sar;
    T* ct = c + m0 * ldc;
    for (int64_t j = j0; j < j1; j += W) {
      const int64_t cols = j1 - j < W ? j1 - j : W;
      const bool first = m0 == 0 && j == j0;
      switch (rows) {
        case 1: tile_ab<T, 1, Stream>(at, sar, sak, b + j, ldb, ct + j, ldc, K, cols, first); break;
        case 2: tile_ab<T, 2, Stream>(at, sar, sak, b + j, ldb, ct + j, ldc, K, cols, first); break;
        case 3: tile_ab<T, 3, Stream>(at, sar, sak, b + j, ldb, ct + j, ldc, K, cols, first); break;
        case 4: tile_ab<T, 4, Stream>(at, sar, sak, b + j, ldb, ct + j, ldc, K, cols, first); break;
        case 5: tile_ab<T, 5, Stream>(at, sar, sak, b + j, ldb, ct + j, ldc, K, cols, first); break;
        default: tile_ab<T, 6, Stream>(at, sar, sak, b + j, ldb, ct + j, ldc, K, cols, first); break;
      }
    }
  }
}

constexpr int DR = 4;  // rows of dY per dot tile
constexpr int DI = 3;  // rows of W per dot tile

// C[R, I] = A[R, K] · B[I, K]ᵀ with A, B, C row-major (lda, ldb, ldc): B's rows are read
// contiguously, each once per tile of R rows of A.
template <typename T, int R, int I>
inline void tile_abt(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
                     int64_t K) {
  using A = typename Acc<T>::type;
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes;
  V acc[R][I] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V bv[I];
#pragma GCC unroll 3
    for (int i = 0; i < I; ++i) {
      __builtin_prefetch(b + (i + PREFETCH) * ldb + k, 0, 2);
      bv[i] = load(b + i * ldb + k);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const V av = load(a + r * lda + k);
#pragma GCC unroll 3
      for (int i = 0; i < I; ++i) acc[r][i] += av * bv[i];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < I; ++i) {
      A s = 0;
      for (int l = 0; l < L; ++l) s += acc[r][i][l];
      for (int64_t kk = k; kk < K; ++kk) s += to_acc(a[r * lda + kk]) * to_acc(b[i * ldb + kk]);
      c[r * ldc + i] = from_acc<T>(s);
    }
}

template <typename T, int R>
inline void rows_abt(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
                     int64_t K, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + DI <= i1; i += DI) tile_abt<T, R, DI>(a, lda, b + i * ldb, ldb, c + i, ldc, K);
  for (; i < i1; ++i) tile_abt<T, R, 1>(a, lda, b + i * ldb, ldb, c + i, ldc, K);
}

template <typename T>
void gemm_abt(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t M,
              int64_t K, int64_t i0, int64_t i1) {
  for (int64_t m0 = 0; m0 < M; m0 += DR) {
    const int64_t rows = M - m0 < DR ? M - m0 : DR;
    const T* at = a + m0 * lda;
    T* ct = c + m0 * ldc;
    switch (rows) {
      case 1: rows_abt<T, 1>(at, lda, b, ldb, ct, ldc, K, i0, i1); break;
      case 2: rows_abt<T, 2>(at, lda, b, ldb, ct, ldc, K, i0, i1); break;
      case 3: rows_abt<T, 3>(at, lda, b, ldb, ct, ldc, K, i0, i1); break;
      default: rows_abt<T, 4>(at, lda, b, ldb, ct, ldc, K, i0, i1); break;
    }
  }
}

constexpr int64_t COL_BLOCK = 128;  // columns of C per work item
constexpr int64_t ROW_BLOCK = 48;   // rows of W per input-gradient work item

struct Item {
  int64_t expert, begin, end;
};

// Work items: (expert, [begin, end) of `width` output columns), for the experts `keep` accepts.
template <typename Keep>
std::vector<Item> items(const int64_t* counts, int64_t n, int64_t width, int64_t block,
                        Keep keep) {
  std::vector<Item> out;
  for (int64_t e = 0; e < n; ++e) {
    if (!keep(counts[e])) continue;
    for (int64_t j = 0; j < width; j += block)
      out.push_back({e, j, j + block < width ? j + block : width});
  }
  return out;
}

std::vector<int64_t> offsets(const int64_t* counts, int64_t n) {
  std::vector<int64_t> off(n + 1, 0);
  for (int64_t e = 0; e < n; ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

template <typename T>
void forward(const T* x, const T* w, T* y, const int64_t* counts, int64_t n, int64_t p,
             int64_t q, int threads) {
  const auto off = offsets(counts, n);
  const auto work = items(counts, n, q, COL_BLOCK, [](int64_t m) { return m > 0; });
  const int64_t size = static_cast<int64_t>(work.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < size; ++t) {
    const Item it = work[t];
    const int64_t o = off[it.expert];
    gemm_ab(x + o * p, p, 1, w + it.expert * p * q, q, y + o * q, q, counts[it.expert], p,
            it.begin, it.end);
  }
}

template <typename T>
void input_grad(const T* dy, const T* w, T* dx, const int64_t* counts, int64_t n, int64_t p,
                int64_t q, int threads) {
  const auto off = offsets(counts, n);
  const auto work = items(counts, n, p, ROW_BLOCK, [](int64_t m) { return m > 0; });
  const int64_t size = static_cast<int64_t>(work.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < size; ++t) {
    const Item it = work[t];
    const int64_t o = off[it.expert];
    gemm_abt(dy + o * q, q, w + it.expert * p * q, q, dx + o * p, p, counts[it.expert], q,
             it.begin, it.end);
  }
}

template <typename T, bool Stream>
void weight_grad(const T* x, const T* dy, T* dw, const int64_t* counts, int64_t n, int64_t p,
                 int64_t q, int threads) {
  const auto off = offsets(counts, n);
  const auto work = items(counts, n, q, COL_BLOCK, [](int64_t) { return true; });
  const int64_t size = static_cast<int64_t>(work.size());
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t t = 0; t < size; ++t) {
      const Item it = work[t];
      const int64_t o = off[it.expert], m = counts[it.expert];
      T* out = dw + it.expert * p * q;
      if (m == 0) {
        using V = typename Vec<typename Acc<T>::type>::type;
        constexpr int64_t L = Vec<typename Acc<T>::type>::lanes;
        for (int64_t i = 0; i < p; ++i) {
          int64_t j = it.begin;
          if constexpr (Stream)
            for (; j + L <= it.end; j += L) stream(out + i * q + j, V{});
          for (; j < it.end; ++j) out[i * q + j] = from_acc<T>(0.0f);
        }
        continue;
      }
      // dW_e = X_eᵀ · dY_e: A(i, r) = x[o + r, i] has strides (1, p).
      gemm_ab<T, Stream>(x + o * p, 1, p, dy + o * q, q, out, q, p, m, it.begin, it.end);
    }
#if defined(__AVX__)
    if constexpr (Stream) _mm_sfence();  // this thread's streamed stores are visible to all
#endif
  }
}

template <typename F>
int by_dtype(int dtype, F f) {
  switch (dtype) {
    case 0: f(static_cast<float*>(nullptr)); return 0;
    case 1: f(static_cast<bf16*>(nullptr)); return 0;
    case 2: f(static_cast<double*>(nullptr)); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float64. All arrays contiguous. Returns 0, or 1 for a dtype
// this file does not know.
int smoe_forward(int dtype, const void* x, const void* w, void* y, const int64_t* counts,
                 int64_t n, int64_t p, int64_t q, int threads) {
  return by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward(static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), counts, n,
            p, q, threads);
  });
}

int smoe_input_grad(int dtype, const void* dy, const void* w, void* dx, const int64_t* counts,
                    int64_t n, int64_t p, int64_t q, int threads) {
  return by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    input_grad(static_cast<const T*>(dy), static_cast<const T*>(w), static_cast<T*>(dx), counts,
               n, p, q, threads);
  });
}

// stream: write dW with non-temporal stores (for a gradient larger than the caches).
int smoe_weight_grad(int dtype, const void* x, const void* dy, void* dw, const int64_t* counts,
                     int64_t n, int64_t p, int64_t q, int threads, int stream) {
  return by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    (stream ? weight_grad<T, true> : weight_grad<T, false>)(
        static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), counts, n, p, q,
        threads);
  });
}

}  // extern "C"
