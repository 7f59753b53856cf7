// The building blocks of the masked-linear kernels: which thread moves which
// element, where each tile sits in the grid, and how a live index list turns a
// tile row into a row of memory.
//
// Everything that is index arithmetic is __host__ __device__, so the host
// model in tests/cuda_host/tile_model.cu drives the very same code through a
// whole CTA, thread by thread, and checks every kernel path against a naive
// product on a machine without a GPU. Only the tensor-core fragments (wmma)
// and the barriers are device-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <mma.h>
#endif

#include "masked_linear_kernel.cuh"

#define GROWOP_HD __host__ __device__ __forceinline__

// bf16/fp16 wmma and TF32 need sm_80; a build for an older architecture gets
// stubs that trap (the glue refuses such devices before launching).
#if defined(__CUDACC__) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define GROWOP_HAS_WMMA 1
#else
#define GROWOP_HAS_WMMA 0
#endif

namespace growop::kernels {

// ----------------------------------------------------------------- numbers

// acc_t: what a dot product accumulates in. bf16 and fp16 accumulate in fp32
// and are rounded once, as cuBLAS and the CPU kernels do.
template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc_t = float;
  GROWOP_HD static float to_acc(float v) { return v; }
  GROWOP_HD static float from_acc(float v) { return v; }
  GROWOP_HD static float from_double(double v) { return static_cast<float>(v); }
  GROWOP_HD static float zero() { return 0.0f; }
};

template <>
struct Num<double> {
  using acc_t = double;
  GROWOP_HD static double to_acc(double v) { return v; }
  GROWOP_HD static double from_acc(double v) { return v; }
  GROWOP_HD static double from_double(double v) { return v; }
  GROWOP_HD static double zero() { return 0.0; }
};

template <>
struct Num<__half> {
  using acc_t = float;
  GROWOP_HD static float to_acc(__half v) { return __half2float(v); }
  GROWOP_HD static __half from_acc(float v) { return __float2half_rn(v); }
  // As static_cast<at::Half>(double) does: to float, then to half.
  GROWOP_HD static __half from_double(double v) {
    return __float2half_rn(static_cast<float>(v));
  }
  GROWOP_HD static __half zero() { return __half(__half_raw{0}); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc_t = float;
  GROWOP_HD static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  GROWOP_HD static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
  GROWOP_HD static __nv_bfloat16 from_double(double v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
  GROWOP_HD static __nv_bfloat16 zero() {
    return __nv_bfloat16(__nv_bfloat16_raw{0});
  }
};

// 16 bytes from src to dst, both 16-byte aligned: one vector access on the GPU.
GROWOP_HD void copy16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  std::memcpy(dst, src, 16);
#endif
}

// 16 zero bytes to dst, 16-byte aligned.
GROWOP_HD void zero16(void* dst) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
#else
  std::memset(dst, 0, 16);
#endif
}

GROWOP_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ------------------------------------------------------- live-row compaction
//
// One CTA of kLiveRowsThreads threads walks active[0:width) in chunks; in a
// chunk, thread t owns kLiveRowsPerThread consecutive rows. An exclusive scan
// of the per-thread counts (within each warp by shuffles, then across the
// warps' totals) gives each thread where its live rows go in the list.

constexpr int kLiveRowsThreads = 1024;
constexpr int kLiveRowsPerThread = 4;
constexpr int kLiveRowsChunk = kLiveRowsThreads * kLiveRowsPerThread;

// Bit b is set iff row begin + b is below width and active.
GROWOP_HD unsigned live_bits(const uint8_t* active, int64_t begin, int64_t width) {
  unsigned bits = 0;
#pragma unroll
  for (int b = 0; b < kLiveRowsPerThread; ++b) {
    if (begin + b < width && active[begin + b] != 0) {
      bits |= 1u << b;
    }
  }
  return bits;
}

GROWOP_HD int count_bits(unsigned bits) {
  int n = 0;
#pragma unroll
  for (int b = 0; b < kLiveRowsPerThread; ++b) {
    n += (bits >> b) & 1u;
  }
  return n;
}

// One step of a Kogge-Stone inclusive scan across the 32 lanes of a warp:
// `below` is the running sum of lane - offset (a shuffle up by offset).
GROWOP_HD int scan_step(int inclusive, int below, int lane, int offset) {
  return lane >= offset ? inclusive + below : inclusive;
}

// Writes the live rows among begin + [0, kLiveRowsPerThread) to dst, ascending.
GROWOP_HD void write_live(unsigned bits, int64_t begin, int32_t* dst) {
#pragma unroll
  for (int b = 0; b < kLiveRowsPerThread; ++b) {
    if ((bits >> b) & 1u) {
      *dst++ = static_cast<int32_t>(begin + b);
    }
  }
}

// ------------------------------------------------------------- tile order

// CTA `block` of a tiles_m x tiles_n grid, in groups of group_m tile rows
// swept column by column, so that consecutive CTAs share operand tiles in L2.
struct TileCoord {
  int m;
  int n;
};

GROWOP_HD TileCoord tile_coords(int block, int tiles_m, int tiles_n, int group_m) {
  const int per_group = group_m * tiles_n;
  const int group = block / per_group;
  const int first_m = group * group_m;
  const int group_rows = tiles_m - first_m < group_m ? tiles_m - first_m : group_m;
  const int in_group = block - group * per_group;
  return {first_m + in_group % group_rows, in_group / group_rows};
}

constexpr int kGroupM = 8;

// ----------------------------------------------------------- matrix views

// A matrix seen as (outer, inner): element (o, i) is
// base[row(o) * ld + col(i)], where row and col go through a live index list
// when one is given. The inner dimension has unit stride in memory.
template <typename T>
struct OperandView {
  const T* base = nullptr;
  int64_t ld = 0;
  const int32_t* outer_index = nullptr;  // o -> outer_index[o], or o
  const int32_t* inner_index = nullptr;  // i -> inner_index[i], or i
  int outer_extent = 0;
  int inner_extent = 0;
  // 16-byte vector loads along inner: no inner index, base 16-byte aligned
  // and ld a multiple of the vector.
  bool vec_ok = false;

  GROWOP_HD int64_t row_offset(int o) const {
    return static_cast<int64_t>(outer_index != nullptr ? outer_index[o] : o) * ld;
  }
  GROWOP_HD int64_t col_offset(int i) const {
    return inner_index != nullptr ? inner_index[i] : i;
  }
};

// Where the GEMM's C(m, n) goes: base[row(m) * ld + col(n)], plus
// bias[col(n)] when there is a bias.
template <typename T>
struct OutputView {
  T* base = nullptr;
  int64_t ld = 0;
  const int32_t* rows = nullptr;  // m -> rows[m], or m
  const int32_t* cols = nullptr;  // n -> cols[n], or n
  const T* bias = nullptr;
  int m_extent = 0;
  int n_extent = 0;

  template <typename Acc>
  GROWOP_HD void store(int m, int n, Acc value) const {
    if (m >= m_extent || n >= n_extent) {
      return;
    }
    const int64_t row = rows != nullptr ? rows[m] : m;
    const int64_t col = cols != nullptr ? cols[n] : n;
    if (bias != nullptr) {
      value += Num<T>::to_acc(bias[col]);
    }
    base[row * ld + col] = Num<T>::from_acc(value);
  }
};

// ---------------------------------------------------------- the GEMM problem

// C[m, n] = sum_k A[m, k] B[k, n]; exactly one of m, n, k runs over the live
// rows, and its extent is read from the device at run time.
enum class LiveDim : int { kM, kN, kK };

template <typename T>
struct GemmParams {
  OperandView<T> a;  // K-inner: (m, k); else (k, m)
  OperandView<T> b;  // K-inner: (n, k); else (k, n)
  OutputView<T> c;
  int m = 0;  // the live dimension holds its bound (width) until resolved
  int n = 0;
  int k = 0;
  LiveDim live_dim = LiveDim::kN;
  const int32_t* num_live = nullptr;
  int tiles_m = 0;  // grid: tiles_m * tiles_n CTAs, sized for the bound
  int tiles_n = 0;
};

// Puts the live count in place of the bound and gives the views their extents.
template <bool kAKInner, bool kBKInner, typename T>
GROWOP_HD void resolve_extents(GemmParams<T>& p, int num_live) {
  if (p.live_dim == LiveDim::kM) {
    p.m = num_live;
  } else if (p.live_dim == LiveDim::kN) {
    p.n = num_live;
  } else {
    p.k = num_live;
  }
  p.a.outer_extent = kAKInner ? p.m : p.k;
  p.a.inner_extent = kAKInner ? p.k : p.m;
  p.b.outer_extent = kBKInner ? p.n : p.k;
  p.b.inner_extent = kBKInner ? p.k : p.n;
  p.c.m_extent = p.m;
  p.c.n_extent = p.n;
}

// Shared-memory tiles follow the operand's layout in memory, so the copy from
// global memory is a straight 16-byte copy: a K-inner operand is stored
// [mn][k], any other [k][mn]. Element (mn, k) of the tile is at:
template <bool kKInner, int LD>
GROWOP_HD int smem_index(int mn, int k) {
  return kKInner ? mn * LD + k : k * LD + mn;
}

// ---------------------------------------------------------------- tile copy

// Moves a ROWS x COLS tile (outer x inner) of an operand from global memory
// into registers (load), then into shared memory (store), THREADS threads
// sharing the work in 16-byte vectors: vector v of the tile is
// (v / vectors_per_row, v % vectors_per_row), and thread t takes
// v = it * THREADS + t. Outside the operand the tile holds zeros.
template <typename T, int ROWS, int COLS, int THREADS>
struct TileCopy {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static_assert(COLS % kVec == 0, "a tile row is whole vectors");
  static constexpr int kVecsPerRow = COLS / kVec;
  static_assert((ROWS * kVecsPerRow) % THREADS == 0, "every thread moves as many vectors");
  static constexpr int kIters = ROWS * kVecsPerRow / THREADS;

  alignas(16) T v[kIters * kVec];

  GROWOP_HD static int row_of(int tid, int it) { return (it * THREADS + tid) / kVecsPerRow; }
  GROWOP_HD static int col_of(int tid, int it) {
    return (it * THREADS + tid) % kVecsPerRow * kVec;
  }

  // The tile whose top-left element is (row0, col0) of `src`.
  GROWOP_HD void load(const OperandView<T>& src, int row0, int col0, int tid) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      T* dst = v + it * kVec;
      const int o = row0 + row_of(tid, it);
      const int i = col0 + col_of(tid, it);
      const bool row_ok = o < src.outer_extent;
      if (row_ok && src.vec_ok && i + kVec <= src.inner_extent) {
        copy16(dst, src.base + src.row_offset(o) + i);
      } else {
        const int64_t row = row_ok ? src.row_offset(o) : 0;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          dst[e] = row_ok && i + e < src.inner_extent ? src.base[row + src.col_offset(i + e)]
                                                      : Num<T>::zero();
        }
      }
    }
  }

  // Into a [ROWS][LD] shared-memory tile.
  template <int LD>
  GROWOP_HD void store(T* smem, int tid) const {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      T* dst = smem + row_of(tid, it) * LD + col_of(tid, it);
      if constexpr ((LD * sizeof(T)) % 16 == 0) {
        copy16(dst, v + it * kVec);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          dst[e] = v[it * kVec + e];
        }
      }
    }
  }
};

// ------------------------------------------------------------ CUDA cores

// FFMA (fp32 without TF32) and DFMA (fp64): BM x BN per CTA of 256 threads,
// laid out 16 x 16; thread (ty, tx) owns rows ty + 16 i and columns
// tx + 16 j, so a warp's stores cover 16 consecutive columns.
template <typename T, int BM_, int BN_, int BK_>
struct FmaMath {
  using Elem = T;
  using acc_t = typename Num<T>::acc_t;
  static constexpr int BM = BM_;
  static constexpr int BN = BN_;
  static constexpr int BK = BK_;
  static constexpr int kThreads = 256;
  static constexpr int kThreadsM = 16;
  static constexpr int kThreadsN = 16;
  static constexpr int kTM = BM / kThreadsM;
  static constexpr int kTN = BN / kThreadsN;
  // [mn][k] tiles get rows of an odd number of words, so the 16 columns a
  // warp reads fall in different banks; [k][mn] rows stay 16-byte aligned.
  static constexpr int kPadK = 1;
  static constexpr int kPadMN = 16 / static_cast<int>(sizeof(T));
  static constexpr int kScratchBytes = 0;

  struct Accum {
    acc_t v[kTM][kTN];
  };

  GROWOP_HD static int thread_m(int tid, int i) { return tid / kThreadsN + kThreadsM * i; }
  GROWOP_HD static int thread_n(int tid, int j) { return tid % kThreadsN + kThreadsN * j; }

  GROWOP_HD static void clear(Accum& acc) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        acc.v[i][j] = acc_t(0);
      }
    }
  }

  template <bool kAKInner, bool kBKInner, int LDA, int LDB>
  GROWOP_HD static void mma(Accum& acc, const T* As, const T* Bs, int tid) {
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[kTM];
      acc_t b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        a[i] = Num<T>::to_acc(As[smem_index<kAKInner, LDA>(thread_m(tid, i), kk)]);
      }
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        b[j] = Num<T>::to_acc(Bs[smem_index<kBKInner, LDB>(thread_n(tid, j), kk)]);
      }
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
#pragma unroll
        for (int j = 0; j < kTN; ++j) {
          acc.v[i][j] += a[i] * b[j];
        }
      }
    }
  }

  GROWOP_HD static void epilogue(
      Accum& acc, const OutputView<T>& out, int m0, int n0, int tid, unsigned char*) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        out.store(m0 + thread_m(tid, i), n0 + thread_n(tid, j), acc.v[i][j]);
      }
    }
  }
};

// ------------------------------------------------------------ tensor cores

// 8 warps as 2 x 4, each owning a 64 x 32 block of the 128 x 128 CTA tile as
// 4 x 2 fragments of 16 x 16.
struct WarpLayout {
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = 4;
  static constexpr int kWarpM = 64;
  static constexpr int kWarpN = 32;
  static constexpr int kFrag = 16;
  static constexpr int kFragsM = kWarpM / kFrag;
  static constexpr int kFragsN = kWarpN / kFrag;
  // In the epilogue a warp copies one 16 x 16 fragment at a time through
  // shared memory; lane l writes elements (lane_row(l, e), lane_col(l)),
  // e < kElemsPerLane: half a warp per row, 16 consecutive columns.
  static constexpr int kElemsPerLane = kFrag * kFrag / 32;

  GROWOP_HD static int warp_m0(int warp) { return warp / kWarpsN * kWarpM; }
  GROWOP_HD static int warp_n0(int warp) { return warp % kWarpsN * kWarpN; }
  GROWOP_HD static int lane_row(int lane, int e) { return e * 2 + lane / kFrag; }
  GROWOP_HD static int lane_col(int lane) { return lane % kFrag; }
};

// Stands for wmma::precision::tf32, which exists only where GROWOP_HAS_WMMA.
struct Tf32 {};

// T: the element in memory; Frag: wmma's operand type (T itself, or Tf32 for
// float); FK: the fragments' K.
template <typename T, typename Frag, int FK, int BK_>
struct WmmaMath {
  using Elem = T;
  using acc_t = float;
  using WL = WarpLayout;
  static constexpr int BM = WL::kWarpsM * WL::kWarpM;
  static constexpr int BN = WL::kWarpsN * WL::kWarpN;
  static constexpr int BK = BK_;
  static constexpr int kFragK = FK;
  static constexpr int kThreads = WL::kWarpsM * WL::kWarpsN * 32;
  // wmma wants ldm a multiple of 16 bytes; rows of 16 more bytes than the tile
  // keep ldmatrix-style row reads free of bank conflicts.
  static constexpr int kPadK = 16 / static_cast<int>(sizeof(T));
  static constexpr int kPadMN = 16 / static_cast<int>(sizeof(T));
  static constexpr int kScratchBytes = (kThreads / 32) * WL::kFrag * WL::kFrag * 4;
  static_assert(BK % FK == 0, "");

#if GROWOP_HAS_WMMA
  static constexpr bool kTf32 = std::is_same_v<Frag, Tf32>;
  using WmmaFrag = std::conditional_t<kTf32, nvcuda::wmma::precision::tf32, Frag>;

  struct Accum {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, FK, float> f[WL::kFragsM]
                                                                           [WL::kFragsN];
  };

  __device__ static void clear(Accum& acc) {
#pragma unroll
    for (int i = 0; i < WL::kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < WL::kFragsN; ++j) {
        nvcuda::wmma::fill_fragment(acc.f[i][j], 0.0f);
      }
    }
  }

  template <bool kAKInner, bool kBKInner, int LDA, int LDB>
  __device__ static void mma(Accum& acc, const T* As, const T* Bs, int tid) {
    namespace wmma = nvcuda::wmma;
    // [m][k] in shared memory is A row-major; [k][m] is A column-major.
    // [n][k] is B column-major; [k][n] is B row-major.
    using ALayout = std::conditional_t<kAKInner, wmma::row_major, wmma::col_major>;
    using BLayout = std::conditional_t<kBKInner, wmma::col_major, wmma::row_major>;
    const int warp = tid / 32;
    const int wm = WL::warp_m0(warp);
    const int wn = WL::warp_n0(warp);
#pragma unroll
    for (int kk = 0; kk < BK; kk += FK) {
      wmma::fragment<wmma::matrix_a, 16, 16, FK, WmmaFrag, ALayout> a[WL::kFragsM];
      wmma::fragment<wmma::matrix_b, 16, 16, FK, WmmaFrag, BLayout> b[WL::kFragsN];
#pragma unroll
      for (int i = 0; i < WL::kFragsM; ++i) {
        wmma::load_matrix_sync(a[i], As + smem_index<kAKInner, LDA>(wm + i * 16, kk), LDA);
        if constexpr (kTf32) {
#pragma unroll
          for (int t = 0; t < a[i].num_elements; ++t) {
            a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < WL::kFragsN; ++j) {
        wmma::load_matrix_sync(b[j], Bs + smem_index<kBKInner, LDB>(wn + j * 16, kk), LDB);
        if constexpr (kTf32) {
#pragma unroll
          for (int t = 0; t < b[j].num_elements; ++t) {
            b[j].x[t] = wmma::__float_to_tf32(b[j].x[t]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < WL::kFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < WL::kFragsN; ++j) {
          wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
        }
      }
    }
  }

  // `smem` is free again (the main loop ended on a barrier): each warp stages
  // one fragment at a time in its own 16 x 16 float scratch.
  __device__ static void epilogue(
      Accum& acc, const OutputView<T>& out, int m0, int n0, int tid, unsigned char* smem) {
    namespace wmma = nvcuda::wmma;
    const int warp = tid / 32;
    const int lane = tid % 32;
    float* scratch = reinterpret_cast<float*>(smem) + warp * WL::kFrag * WL::kFrag;
    const int wm = m0 + WL::warp_m0(warp);
    const int wn = n0 + WL::warp_n0(warp);
#pragma unroll
    for (int i = 0; i < WL::kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < WL::kFragsN; ++j) {
        wmma::store_matrix_sync(scratch, acc.f[i][j], WL::kFrag, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < WL::kElemsPerLane; ++e) {
          const int r = WL::lane_row(lane, e);
          const int c = WL::lane_col(lane);
          out.store(wm + i * 16 + r, wn + j * 16 + c, scratch[r * WL::kFrag + c]);
        }
        __syncwarp();
      }
    }
  }
#else
  struct Accum {};
  __device__ static void clear(Accum&) {}
  template <bool kAKInner, bool kBKInner, int LDA, int LDB>
  __device__ static void mma(Accum&, const T*, const T*, int) {
#if defined(__CUDA_ARCH__)
    __trap();
#endif
  }
  __device__ static void epilogue(Accum&, const OutputView<T>&, int, int, int, unsigned char*) {
#if defined(__CUDA_ARCH__)
    __trap();
#endif
  }
#endif
};

// ----------------------------------------------------------- one CTA's tiles

// Shared-memory layout and tile copies of one GEMM configuration: two stages
// of A and B tiles, and the epilogue's scratch over the same bytes.
template <class Math, bool kAKInner, bool kBKInner>
struct CtaTiles {
  using T = typename Math::Elem;
  static constexpr int kARows = kAKInner ? Math::BM : Math::BK;
  static constexpr int kACols = kAKInner ? Math::BK : Math::BM;
  static constexpr int LDA = kACols + (kAKInner ? Math::kPadK : Math::kPadMN);
  static constexpr int kBRows = kBKInner ? Math::BN : Math::BK;
  static constexpr int kBCols = kBKInner ? Math::BK : Math::BN;
  static constexpr int LDB = kBCols + (kBKInner ? Math::kPadK : Math::kPadMN);

  using ACopy = TileCopy<T, kARows, kACols, Math::kThreads>;
  using BCopy = TileCopy<T, kBRows, kBCols, Math::kThreads>;

  static constexpr int round128(int bytes) { return (bytes + 127) / 128 * 128; }
  static constexpr int kAStageBytes = round128(kARows * LDA * static_cast<int>(sizeof(T)));
  static constexpr int kBStageBytes = round128(kBRows * LDB * static_cast<int>(sizeof(T)));
  static constexpr int kTileBytes = 2 * (kAStageBytes + kBStageBytes);
  static constexpr int kBytes =
      kTileBytes > Math::kScratchBytes ? kTileBytes : Math::kScratchBytes;
  static_assert(kBytes <= 48 * 1024, "static shared memory");

  GROWOP_HD static T* a_stage(unsigned char* smem, int stage) {
    return reinterpret_cast<T*>(smem + stage * kAStageBytes);
  }
  GROWOP_HD static T* b_stage(unsigned char* smem, int stage) {
    return reinterpret_cast<T*>(smem + 2 * kAStageBytes + stage * kBStageBytes);
  }

  // The A and B tiles of k-step k0 for the CTA at (m0, n0), into registers.
  GROWOP_HD static void load(
      ACopy& a, BCopy& b, const GemmParams<T>& p, int m0, int n0, int k0, int tid) {
    if constexpr (kAKInner) {
      a.load(p.a, m0, k0, tid);
    } else {
      a.load(p.a, k0, m0, tid);
    }
    if constexpr (kBKInner) {
      b.load(p.b, n0, k0, tid);
    } else {
      b.load(p.b, k0, n0, tid);
    }
  }

  GROWOP_HD static void store(
      const ACopy& a, const BCopy& b, unsigned char* smem, int stage, int tid) {
    a.template store<LDA>(a_stage(smem, stage), tid);
    b.template store<LDB>(b_stage(smem, stage), tid);
  }
};

// The arithmetic for each element type: bf16/fp16 on tensor cores; fp32 on
// tensor cores in TF32 when allowed, else FFMA; fp64 DFMA.
template <typename T, bool kTf32>
struct MathFor;
template <bool kTf32>
struct MathFor<__half, kTf32> {
  using type = WmmaMath<__half, __half, 16, 32>;
};
template <bool kTf32>
struct MathFor<__nv_bfloat16, kTf32> {
  using type = WmmaMath<__nv_bfloat16, __nv_bfloat16, 16, 32>;
};
template <>
struct MathFor<float, true> {
  using type = WmmaMath<float, Tf32, 8, 16>;
};
template <>
struct MathFor<float, false> {
  using type = FmaMath<float, 128, 128, 16>;
};
template <bool kTf32>
struct MathFor<double, kTf32> {
  using type = FmaMath<double, 64, 64, 16>;
};

// ---------------------------------------------------------- the three GEMMs
//
// How each op's product is laid out: which operand runs over the live rows,
// and through which index. The launchers and the host model build their
// problems here.

inline bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

template <typename T>
OperandView<T> operand(const void* base, int64_t ld) {
  OperandView<T> view;
  view.base = static_cast<const T*>(base);
  view.ld = ld;
  view.vec_ok = aligned16(base) && ld % (16 / static_cast<int64_t>(sizeof(T))) == 0;
  return view;
}

template <typename T>
OutputView<T> output(void* base, int64_t ld) {
  OutputView<T> view;
  view.base = static_cast<T*>(base);
  view.ld = ld;
  return view;
}

// out(b, j) = x(b, :) . W(live[j], :) + bias(live[j]): M = batch, N = live, K = in.
struct ForwardGemm {
  static constexpr bool kAKInner = true;  // x is (b, i)
  static constexpr bool kBKInner = true;  // W is (j, i), rows through the list
  template <typename T>
  static GemmParams<T> build(const ForwardParams& p) {
    GemmParams<T> g;
    g.a = operand<T>(p.input, p.input_row_stride);
    g.b = operand<T>(p.weight, p.weight_row_stride);
    g.b.outer_index = p.live_rows;
    g.c = output<T>(p.out, p.out_row_stride);
    g.c.cols = p.live_rows;
    g.c.bias = static_cast<const T*>(p.bias);
    g.m = p.batch;
    g.n = p.width;
    g.k = p.in_features;
    g.live_dim = LiveDim::kN;
    g.num_live = p.num_live;
    return g;
  }
};

// grad_input(b, i) = sum_j g(b, live[j]) W(live[j], i): M = batch, N = in, K = live.
struct BackwardInputGemm {
  static constexpr bool kAKInner = true;   // g is (b, j), columns through the list
  static constexpr bool kBKInner = false;  // W is (j, i), rows through the list
  template <typename T>
  static GemmParams<T> build(const BackwardParams& p) {
    GemmParams<T> g;
    g.a = operand<T>(p.grad_output, p.grad_output_row_stride);
    g.a.inner_index = p.live_rows;
    g.a.vec_ok = false;
    g.b = operand<T>(p.weight, p.weight_row_stride);
    g.b.outer_index = p.live_rows;
    g.c = output<T>(p.grad_input, p.grad_input_row_stride);
    g.m = p.batch;
    g.n = p.in_features;
    g.k = p.width;
    g.live_dim = LiveDim::kK;
    g.num_live = p.num_live;
    return g;
  }
};

// grad_weight(live[j], i) = sum_b g(b, live[j]) x(b, i): M = live, N = in, K = batch.
struct BackwardWeightGemm {
  static constexpr bool kAKInner = false;  // g is (b, j), columns through the list
  static constexpr bool kBKInner = false;  // x is (b, i)
  template <typename T>
  static GemmParams<T> build(const BackwardParams& p) {
    GemmParams<T> g;
    g.a = operand<T>(p.grad_output, p.grad_output_row_stride);
    g.a.inner_index = p.live_rows;
    g.a.vec_ok = false;
    g.b = operand<T>(p.input, p.input_row_stride);
    g.c = output<T>(p.grad_weight, p.grad_weight_row_stride);
    g.c.rows = p.live_rows;
    g.m = p.width;
    g.n = p.in_features;
    g.k = p.batch;
    g.live_dim = LiveDim::kM;
    g.num_live = p.num_live;
    return g;
  }
};

// Sizes the grid for the bound of the live dimension; returns the CTA count.
template <class Math, typename T>
int64_t size_grid(GemmParams<T>& p) {
  p.tiles_m = ceil_div(p.m, Math::BM);
  p.tiles_n = ceil_div(p.n, Math::BN);
  return static_cast<int64_t>(p.tiles_m) * p.tiles_n;
}

// ------------------------------------------------- the small kernels' bodies

// Column `col` of out gets `value` in rows row0, row0 + row_step, ... if it is
// below width and not live.
template <typename T>
GROWOP_HD void fill_dead_column(
    T* out, int64_t ld, int batch, int width, const uint8_t* active, T value,
    int col, int64_t row0, int64_t row_step) {
  if (col >= width || active[col] != 0) {
    return;
  }
  for (int64_t row = row0; row < batch; row += row_step) {
    out[row * ld + col] = value;
  }
}

// Thread `tid` of `threads` zeros its share of row `row` of grad_weight if
// the row is not live; a live row is not touched.
template <typename T>
GROWOP_HD void zero_dead_row(
    T* grad_weight, int64_t ld, int cols, int width, const uint8_t* active, bool vec_ok,
    int row, int tid, int threads) {
  if (row < width && active[row] != 0) {
    return;
  }
  T* dst = grad_weight + row * ld;
  if (vec_ok) {  // 16-byte aligned rows, cols a multiple of the vector
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    for (int c = tid * kVec; c < cols; c += threads * kVec) {
      zero16(dst + c);
    }
  } else {
    for (int c = tid; c < cols; c += threads) {
      dst[c] = Num<T>::zero();
    }
  }
}

// Sum of rows row0, row0 + row_step, ... of column col of grad_output, or
// zero if the column is not live.
template <typename T>
GROWOP_HD typename Num<T>::acc_t bias_partial_sum(
    const T* grad_output, int64_t ld, int batch, int width, const uint8_t* active,
    int col, int row0, int row_step) {
  using acc_t = typename Num<T>::acc_t;
  acc_t sum = acc_t(0);
  if (col < width && active[col] != 0) {
    for (int64_t row = row0; row < batch; row += row_step) {
      sum += Num<T>::to_acc(grad_output[row * ld + col]);
    }
  }
  return sum;
}

}  // namespace growop::kernels
