// Host model of the CUDA kernels: runs without a GPU.
//
// Built by tests/test_cuda_compile.py with `nvcc -x cu` as a host program. It
// drives the kernels' own __host__ __device__ code (csrc/cuda/
// masked_linear_tiles.cuh: tile order, problem builders, tile copies through
// the live list, FFMA math and its epilogue, the small kernels' bodies) over
// every CTA and thread of a launch, in the kernels' order of phases, and
// plays out what only the device can do:
//   - the compaction's warp shuffles and barriers, lane by lane;
//   - each warp's wmma fragments, read from shared memory with the layouts and
//     pointers the kernel hands to load_matrix_sync (alignment and ldm
//     checked), and the epilogue's lane-to-element map.
// Data are small integers, so every sum is exact in every accumulator and the
// results must equal the reference rounded once to the dtype, bit for bit.
// Outputs start as NaN, so an element the kernels should write and do not,
// or one they should leave alone and do not, fails.
//
// Between the two shared-memory stages the model stores the next stage
// before it multiplies the current one (the kernel does it after): a store
// that hit the stage being read would show.
#include "../../csrc/cuda/masked_linear_tiles.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using namespace growop::kernels;

namespace {

int g_checks = 0;
int g_failures = 0;

#define EXPECT(cond, ...)                                        \
  do {                                                           \
    ++g_checks;                                                  \
    if (!(cond)) {                                               \
      if (++g_failures <= 25) {                                  \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
        std::printf(__VA_ARGS__);                                \
        std::printf("\n");                                       \
      }                                                          \
    }                                                            \
  } while (0)

template <typename T>
double as_double(T v) {
  return static_cast<double>(Num<T>::to_acc(v));
}

template <typename T>
T from_double(double v) {
  return Num<T>::from_acc(static_cast<typename Num<T>::acc_t>(v));
}

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, double>) return "f64";
  if constexpr (std::is_same_v<T, __half>) return "f16";
  return "bf16";
}

// Memory with room to misalign on purpose; alignment 128 otherwise.
template <typename T>
struct Buffer {
  std::vector<unsigned char> bytes;
  T* data = nullptr;
  Buffer(size_t n, int misalign_elements = 0) : bytes((n + 64) * sizeof(T) + 256) {
    uintptr_t p = reinterpret_cast<uintptr_t>(bytes.data());
    p = (p + 127) / 128 * 128 + misalign_elements * sizeof(T);
    data = reinterpret_cast<T*>(p);
    for (size_t i = 0; i < n; ++i) data[i] = from_double<T>(NAN);
  }
};

// ----------------------------------------------------------------- compaction

// live_rows_kernel, with its shuffles and barriers played out lane by lane.
std::vector<int32_t> model_live_rows(const std::vector<uint8_t>& active, int width, int* num_live) {
  std::vector<int32_t> live(width + 1, -1);
  std::vector<unsigned> bits(kLiveRowsThreads);
  std::vector<int> count(kLiveRowsThreads), inclusive(kLiveRowsThreads), before_step(kLiveRowsThreads);
  int warp_totals[kLiveRowsThreads / 32];
  int found = 0;
  auto warp_scan = [&](int* values, int lanes_base) {
    for (int offset = 1; offset < 32; offset *= 2) {
      int snapshot[32];
      for (int lane = 0; lane < 32; ++lane) snapshot[lane] = values[lanes_base + lane];
      for (int lane = 0; lane < 32; ++lane) {
        // __shfl_up_sync: lane reads lane - offset, or its own value below offset
        const int below = lane >= offset ? snapshot[lane - offset] : snapshot[lane];
        values[lanes_base + lane] = scan_step(snapshot[lane], below, lane, offset);
      }
    }
  };
  for (int64_t chunk = 0; chunk < width; chunk += kLiveRowsChunk) {
    for (int tid = 0; tid < kLiveRowsThreads; ++tid) {
      bits[tid] = live_bits(active.data(), chunk + int64_t(tid) * kLiveRowsPerThread, width);
      count[tid] = count_bits(bits[tid]);
      inclusive[tid] = count[tid];
    }
    for (int warp = 0; warp < kLiveRowsThreads / 32; ++warp) warp_scan(inclusive.data(), warp * 32);
    for (int warp = 0; warp < kLiveRowsThreads / 32; ++warp) warp_totals[warp] = inclusive[warp * 32 + 31];
    warp_scan(warp_totals, 0);  // warp 0 over the warps' totals
    for (int tid = 0; tid < kLiveRowsThreads; ++tid) {
      const int warp = tid / 32;
      const int before = found + (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive[tid] - count[tid];
      EXPECT(before >= 0 && before + count[tid] <= width, "compaction writes in bounds");
      write_live(bits[tid], chunk + int64_t(tid) * kLiveRowsPerThread, live.data() + 1 + before);
    }
    found += warp_totals[31];
  }
  live[0] = found;
  *num_live = found;
  return live;
}

void test_compaction() {
  std::mt19937 rng(1);
  const int widths[] = {0, 1, 3, 4, 5, 31, 32, 33, 127, 128, 129, 1000, 4095, 4096, 4097, 8197, 40000};
  const double densities[] = {0.0, 0.01, 0.5, 0.97, 1.0};
  for (const int width : widths) {
    for (const double density : densities) {
      for (const int pattern : {0, 1, 2}) {
        const int capacity = width + 7;
        std::vector<uint8_t> active(capacity, 1);  // rows past width live: must be ignored
        std::bernoulli_distribution live(density);
        for (int j = 0; j < width; ++j) {
          active[j] = pattern == 0 ? live(rng) : pattern == 1 ? j < width * density : j % 2;
        }
        int num_live = -1;
        const std::vector<int32_t> got = model_live_rows(active, width, &num_live);
        std::vector<int32_t> expected;
        for (int j = 0; j < width; ++j)
          if (active[j]) expected.push_back(j);
        EXPECT(num_live == int(expected.size()), "width %d: %d live, expected %zu", width, num_live,
               expected.size());
        bool same = num_live == int(expected.size());
        for (int i = 0; same && i < num_live; ++i) same = got[1 + i] == expected[i];
        EXPECT(same, "width %d density %.2f pattern %d: live list differs", width, density, pattern);
        bool untouched = true;
        for (int i = 1 + num_live; i <= width; ++i) untouched = untouched && got[i] == -1;
        EXPECT(untouched, "width %d: written past the live count", width);
      }
    }
  }
}

// ---------------------------------------------------------------- tile order

void test_tile_order() {
  for (int tiles_m = 1; tiles_m <= 21; ++tiles_m) {
    for (int tiles_n = 1; tiles_n <= 19; ++tiles_n) {
      for (const int group : {1, 3, kGroupM}) {
        std::set<std::pair<int, int>> seen;
        bool in_range = true;
        for (int block = 0; block < tiles_m * tiles_n; ++block) {
          const TileCoord t = tile_coords(block, tiles_m, tiles_n, group);
          in_range = in_range && t.m >= 0 && t.m < tiles_m && t.n >= 0 && t.n < tiles_n;
          seen.insert({t.m, t.n});
        }
        EXPECT(in_range && int(seen.size()) == tiles_m * tiles_n,
               "tile_coords(%d x %d, group %d) is not a bijection", tiles_m, tiles_n, group);
      }
    }
  }
  std::set<std::pair<int, int>> cells;
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < WarpLayout::kElemsPerLane; ++e)
      cells.insert({WarpLayout::lane_row(lane, e), WarpLayout::lane_col(lane)});
  bool inside = true;
  for (const auto& [r, c] : cells) inside = inside && r >= 0 && r < 16 && c >= 0 && c < 16;
  EXPECT(cells.size() == 256 && inside, "the epilogue's lanes cover a 16 x 16 fragment once");
  std::set<std::pair<int, int>> warps;
  for (int w = 0; w < 8; ++w) warps.insert({WarpLayout::warp_m0(w), WarpLayout::warp_n0(w)});
  EXPECT(warps.size() == 8, "warps own distinct blocks of the CTA tile");
}

// ---------------------------------------------------------------- GEMM model

template <class Math>
struct IsWmma : std::false_type {};
template <typename T, typename F, int FK, int BK>
struct IsWmma<WmmaMath<T, F, FK, BK>> : std::true_type {};

// One CTA's accumulators: each thread's for FFMA, each warp's fragments for wmma.
template <class Math, bool = IsWmma<Math>::value>
struct CtaAccum {
  std::vector<typename Math::Accum> threads = std::vector<typename Math::Accum>(Math::kThreads);
  void clear() {
    for (auto& a : threads) Math::clear(a);
  }
};
template <class Math>
struct CtaAccum<Math, true> {
  static constexpr int kWarps = Math::kThreads / 32;
  // [warp][i][j][r][c]
  std::vector<double> v = std::vector<double>(kWarps * WarpLayout::kFragsM * WarpLayout::kFragsN * 256);
  double& at(int warp, int i, int j, int r, int c) {
    return v[(((warp * WarpLayout::kFragsM + i) * WarpLayout::kFragsN + j) * 16 + r) * 16 + c];
  }
  void clear() { std::fill(v.begin(), v.end(), 0.0); }
};

template <class Math, bool kAKInner, bool kBKInner, int LDA, int LDB, typename T>
void model_mma(CtaAccum<Math>& acc, const T* As, const T* Bs, const unsigned char* smem) {
  if constexpr (!IsWmma<Math>::value) {
    for (int tid = 0; tid < Math::kThreads; ++tid)
      Math::template mma<kAKInner, kBKInner, LDA, LDB>(acc.threads[tid], As, Bs, tid);
  } else {
    constexpr int FK = Math::kFragK;
    static_assert((LDA * sizeof(T)) % 16 == 0 && (LDB * sizeof(T)) % 16 == 0, "wmma ldm");
    auto aligned32 = [&](const T* p) {
      return (reinterpret_cast<const unsigned char*>(p) - smem) % 32 == 0;
    };
    for (int warp = 0; warp < Math::kThreads / 32; ++warp) {
      const int wm = WarpLayout::warp_m0(warp);
      const int wn = WarpLayout::warp_n0(warp);
      for (int kk = 0; kk < Math::BK; kk += FK) {
        for (int i = 0; i < WarpLayout::kFragsM; ++i) {
          const T* a = As + smem_index<kAKInner, LDA>(wm + i * 16, kk);  // as in WmmaMath::mma
          EXPECT(aligned32(a), "matrix_a fragment pointer 32-byte aligned");
          for (int j = 0; j < WarpLayout::kFragsN; ++j) {
            const T* b = Bs + smem_index<kBKInner, LDB>(wn + j * 16, kk);
            if (i == 0) EXPECT(aligned32(b), "matrix_b fragment pointer 32-byte aligned");
            for (int r = 0; r < 16; ++r) {
              for (int c = 0; c < 16; ++c) {
                double sum = 0;
                for (int t = 0; t < FK; ++t) {
                  // load_matrix_sync: row_major (row, col) at p[row * ldm + col],
                  // col_major at p[col * ldm + row]
                  const T av = kAKInner ? a[r * LDA + t] : a[t * LDA + r];  // A: row_major iff K-inner
                  const T bv = kBKInner ? b[c * LDB + t] : b[t * LDB + c];  // B: col_major iff K-inner
                  sum += as_double(av) * as_double(bv);
                }
                acc.at(warp, i, j, r, c) += sum;
              }
            }
          }
        }
      }
    }
  }
}

template <class Math, typename T>
void model_epilogue(CtaAccum<Math>& acc, const OutputView<T>& out, int m0, int n0, unsigned char* smem) {
  if constexpr (!IsWmma<Math>::value) {
    for (int tid = 0; tid < Math::kThreads; ++tid) Math::epilogue(acc.threads[tid], out, m0, n0, tid, smem);
  } else {
    for (int warp = 0; warp < Math::kThreads / 32; ++warp) {
      float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
      for (int i = 0; i < WarpLayout::kFragsM; ++i) {
        for (int j = 0; j < WarpLayout::kFragsN; ++j) {
          for (int r = 0; r < 16; ++r)  // store_matrix_sync, mem_row_major, ldm 16
            for (int c = 0; c < 16; ++c) scratch[r * 16 + c] = float(acc.at(warp, i, j, r, c));
          for (int lane = 0; lane < 32; ++lane) {
            for (int e = 0; e < WarpLayout::kElemsPerLane; ++e) {
              const int r = WarpLayout::lane_row(lane, e);
              const int c = WarpLayout::lane_col(lane);
              out.store(m0 + WarpLayout::warp_m0(warp) + i * 16 + r,
                        n0 + WarpLayout::warp_n0(warp) + j * 16 + c, scratch[r * 16 + c]);
            }
          }
        }
      }
    }
  }
}

// masked_gemm_kernel over its whole grid.
template <typename T, class Math, class Gemm>
void model_gemm(GemmParams<T> p) {
  constexpr bool kA = Gemm::kAKInner;
  constexpr bool kB = Gemm::kBKInner;
  using Tiles = CtaTiles<Math, kA, kB>;
  const int64_t blocks = size_grid<Math>(p);
  std::vector<unsigned char> smem_bytes(Tiles::kBytes + 128);
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_bytes.data()) + 127) / 128 * 128);
  std::vector<typename Tiles::ACopy> a_regs(Math::kThreads);
  std::vector<typename Tiles::BCopy> b_regs(Math::kThreads);
  CtaAccum<Math> acc;
  for (int block = 0; block < blocks; ++block) {
    GemmParams<T> q = p;
    resolve_extents<kA, kB>(q, *p.num_live);
    const TileCoord tile = tile_coords(block, q.tiles_m, q.tiles_n, kGroupM);
    const int m0 = tile.m * Math::BM;
    const int n0 = tile.n * Math::BN;
    if (m0 >= q.m || n0 >= q.n) continue;
    std::fill(smem_bytes.begin(), smem_bytes.end(), 0xff);  // NaN patterns in every dtype
    acc.clear();
    const int k_tiles = ceil_div(q.k, Math::BK);
    if (k_tiles > 0) {
      for (int tid = 0; tid < Math::kThreads; ++tid) Tiles::load(a_regs[tid], b_regs[tid], q, m0, n0, 0, tid);
      for (int tid = 0; tid < Math::kThreads; ++tid) Tiles::store(a_regs[tid], b_regs[tid], smem, 0, tid);
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int stage = kt & 1;
      if (kt + 1 < k_tiles) {
        for (int tid = 0; tid < Math::kThreads; ++tid)
          Tiles::load(a_regs[tid], b_regs[tid], q, m0, n0, (kt + 1) * Math::BK, tid);
        for (int tid = 0; tid < Math::kThreads; ++tid)
          Tiles::store(a_regs[tid], b_regs[tid], smem, stage ^ 1, tid);
      }
      model_mma<Math, kA, kB, Tiles::LDA, Tiles::LDB>(acc, Tiles::a_stage(smem, stage),
                                                      Tiles::b_stage(smem, stage), smem);
    }
    model_epilogue<Math>(acc, q.c, m0, n0, smem);
  }
}

// ---------------------------------------------------------------- the ops

struct Case {
  const char* name;
  int batch, in_features, capacity, width;
  int kind;  // 0 all, 1 prefix 2/3, 2 random half, 3 runs and fragments, 4 none, 5 single
  int pad;  // extra elements per row of every matrix
  int misalign;  // elements by which every operand's base is off 128-byte alignment
};

std::vector<uint8_t> make_active(const Case& c, std::mt19937& rng) {
  std::vector<uint8_t> active(c.capacity, 0);
  std::bernoulli_distribution half(0.5);
  for (int j = 0; j < c.capacity; ++j) {
    switch (c.kind) {
      case 0: active[j] = 1; break;
      case 1: active[j] = j < c.capacity * 2 / 3; break;
      case 2: active[j] = half(rng); break;
      case 3: active[j] = j < 130 || (j >= 300 && j < 700 && half(rng)) || j >= 800; break;
      case 4: active[j] = 0; break;
      case 5: active[j] = j == c.capacity / 2; break;
    }
  }
  return active;
}

template <typename T>
void fill_ints(T* data, int rows, int cols, int64_t ld, std::mt19937& rng) {
  std::uniform_int_distribution<int> value(-2, 2);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) data[r * ld + c] = from_double<T>(value(rng));
}

template <typename T>
bool same_value(T got, double exact) {
  return as_double(got) == as_double(from_double<T>(exact));
}

template <typename T, bool kTf32>
void test_ops(const Case& c) {
  using Math = typename MathFor<T, kTf32>::type;
  const std::string what = std::string(c.name) + " " + type_name<T>() + (kTf32 ? " tf32" : "");
  std::mt19937 rng(7);
  const std::vector<uint8_t> active = make_active(c, rng);
  int num_live = 0;
  std::vector<int32_t> list = model_live_rows(active, c.width, &num_live);
  const int32_t* live = list.data() + 1;
  const int64_t ld_in = c.in_features + c.pad, ld_w = c.in_features + c.pad, ld_out = c.width + c.pad;

  Buffer<T> x(size_t(c.batch) * ld_in + 1, c.misalign), w(size_t(c.capacity) * ld_w + 1, c.misalign);
  Buffer<T> bias(c.capacity + 1, c.misalign), g(size_t(c.batch) * ld_out + 1, c.misalign);
  fill_ints(x.data, c.batch, c.in_features, ld_in, rng);
  fill_ints(w.data, c.capacity, c.in_features, ld_w, rng);
  fill_ints(bias.data, 1, c.capacity, 0, rng);
  fill_ints(g.data, c.batch, c.width, ld_out, rng);
  auto X = [&](int b, int i) { return as_double(x.data[b * ld_in + i]); };
  auto W = [&](int j, int i) { return as_double(w.data[j * ld_w + i]); };
  auto G = [&](int b, int j) { return as_double(g.data[b * ld_out + j]); };
  auto is_live = [&](int j) { return j < c.width && active[j]; };

  {  // forward: the GEMM, then the fill of dead columns, as the launcher orders them
    Buffer<T> out(size_t(c.batch) * ld_out);
    ForwardParams p{};
    p.input = x.data; p.input_row_stride = ld_in;
    p.weight = w.data; p.weight_row_stride = ld_w;
    p.bias = bias.data; p.active = active.data();
    p.live_rows = live; p.num_live = list.data();
    p.out = out.data; p.out_row_stride = ld_out;
    p.batch = c.batch; p.in_features = c.in_features; p.width = c.width;
    const T mask_value = Num<T>::from_double(-1e300);  // as static_cast: -inf, or lowest
    if (c.batch > 0 && c.width > 0) {
      model_gemm<T, Math, ForwardGemm>(ForwardGemm::build<T>(p));
      const int grid_y = c.batch < 256 ? c.batch : 256;
      for (int col = 0; col < ceil_div(c.width, 256) * 256; ++col)
        for (int y = 0; y < grid_y; ++y)
          fill_dead_column(out.data, ld_out, c.batch, c.width, active.data(), mask_value, col, y, grid_y);
    }
    int bad = 0;
    for (int b = 0; b < c.batch; ++b) {
      for (int j = 0; j < ld_out; ++j) {
        const T got = out.data[b * ld_out + j];
        if (j >= c.width) {
          bad += !std::isnan(as_double(got));
          continue;
        }
        if (!is_live(j)) {
          bad += as_double(got) != as_double(mask_value);
          continue;
        }
        double exact = as_double(bias.data[j]);
        for (int i = 0; i < c.in_features; ++i) exact += X(b, i) * W(j, i);
        bad += !same_value(got, exact);
      }
    }
    EXPECT(bad == 0, "%s forward: %d wrong elements", what.c_str(), bad);
  }

  {  // backward input
    Buffer<T> grad_input(size_t(c.batch) * ld_in);
    BackwardParams p{};
    p.grad_output = g.data; p.grad_output_row_stride = ld_out;
    p.weight = w.data; p.weight_row_stride = ld_w;
    p.live_rows = live; p.num_live = list.data();
    p.grad_input = grad_input.data; p.grad_input_row_stride = ld_in;
    p.batch = c.batch; p.in_features = c.in_features; p.width = c.width;
    model_gemm<T, Math, BackwardInputGemm>(BackwardInputGemm::build<T>(p));
    int bad = 0;
    for (int b = 0; b < c.batch; ++b) {
      for (int i = 0; i < ld_in; ++i) {
        const T got = grad_input.data[b * ld_in + i];
        if (i >= c.in_features) {
          bad += !std::isnan(as_double(got));
          continue;
        }
        double exact = 0;
        for (int j = 0; j < c.width; ++j)
          if (is_live(j)) exact += G(b, j) * W(j, i);
        bad += !same_value(got, exact);
      }
    }
    EXPECT(bad == 0, "%s backward input: %d wrong elements", what.c_str(), bad);
  }

  {  // backward weight: dead rows zeroed, then the GEMM over live rows
    Buffer<T> grad_weight(size_t(c.capacity) * ld_w, c.misalign);
    BackwardParams p{};
    p.grad_output = g.data; p.grad_output_row_stride = ld_out;
    p.input = x.data; p.input_row_stride = ld_in;
    p.active = active.data();
    p.live_rows = live; p.num_live = list.data();
    p.grad_weight = grad_weight.data; p.grad_weight_row_stride = ld_w;
    p.batch = c.batch; p.in_features = c.in_features; p.width = c.width; p.capacity = c.capacity;
    constexpr int kVec = 16 / int(sizeof(T));
    const bool vec_ok = aligned16(grad_weight.data) && ld_w % kVec == 0 && c.in_features % kVec == 0;
    for (int row = 0; row < c.capacity; ++row)
      for (int tid = 0; tid < 256; ++tid)
        zero_dead_row(grad_weight.data, ld_w, c.in_features, c.width, active.data(), vec_ok, row, tid, 256);
    int touched = 0;  // the zeroing must leave live rows (still NaN) alone
    for (int j = 0; j < c.capacity; ++j)
      for (int i = 0; i < c.in_features; ++i)
        touched += is_live(j) && !std::isnan(as_double(grad_weight.data[j * ld_w + i]));
    EXPECT(touched == 0, "%s zero_dead_row wrote %d elements of live rows", what.c_str(), touched);
    if (c.width > 0) model_gemm<T, Math, BackwardWeightGemm>(BackwardWeightGemm::build<T>(p));
    int bad = 0;
    for (int j = 0; j < c.capacity; ++j) {
      for (int i = 0; i < ld_w; ++i) {
        const T got = grad_weight.data[j * ld_w + i];
        if (i >= c.in_features) {
          bad += !std::isnan(as_double(got));
          continue;
        }
        double exact = 0;
        if (is_live(j))
          for (int b = 0; b < c.batch; ++b) exact += G(b, j) * X(b, i);
        bad += is_live(j) ? !same_value(got, exact) : as_double(got) != 0.0;
      }
    }
    EXPECT(bad == 0, "%s backward weight: %d wrong elements", what.c_str(), bad);
  }

  if (!kTf32) {  // backward bias: kBiasRows partial sums per column, then their total
    int bad = 0;
    for (int col = 0; col < c.capacity; ++col) {
      typename Num<T>::acc_t total = 0;
      for (int ty = 0; ty < 8; ++ty)
        total += bias_partial_sum(g.data, ld_out, c.batch, c.width, active.data(), col, ty, 8);
      double exact = 0;
      if (is_live(col))
        for (int b = 0; b < c.batch; ++b) exact += G(b, col);
      bad += !same_value(Num<T>::from_acc(total), exact);
    }
    EXPECT(bad == 0, "%s backward bias: %d wrong elements", what.c_str(), bad);
  }
}

}  // namespace

int main() {
  test_compaction();
  test_tile_order();
  const Case cases[] = {
      {"1x1", 1, 1, 1, 1, 0, 0, 0},
      {"odd-in-random", 5, 37, 300, 295, 2, 0, 0},
      {"aligned-random", 130, 64, 300, 290, 2, 0, 0},
      {"padded-runs", 257, 100, 900, 880, 3, 4, 0},
      {"none-live", 64, 48, 200, 200, 4, 0, 0},
      {"single", 3, 16, 129, 129, 5, 0, 0},
      {"prefix-early-exit", 140, 33, 1100, 1000, 1, 3, 0},
      {"misaligned-base", 70, 64, 260, 250, 2, 0, 1},
      {"all-k-tail", 129, 130, 257, 257, 0, 0, 0},
      {"in-zero", 9, 0, 40, 33, 2, 0, 0},
      {"batch-zero", 0, 24, 50, 40, 2, 0, 0},
  };
  for (const Case& c : cases) {
    test_ops<float, false>(c);
    test_ops<float, true>(c);
    test_ops<double, false>(c);
    test_ops<__half, false>(c);
    test_ops<__nv_bfloat16, false>(c);
  }
  std::printf("tile model: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
