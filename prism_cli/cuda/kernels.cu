// prism's sub-expert MoE kernels: bfloat16 / float16 inputs, float32 accumulation, deterministic.
//
// The semantics of every op are those of reference.py, its torch twin and oracle. Layout (the flat
// sub-expert export): G sub-experts of width Is; gate_up [G, 2 Is, H] (gate rows, then up rows),
// down [G, H, Is]; routing ids [T, P] (any id outside [0, G), e.g. the sentinel G, marks an unused
// slot) and routing weights [T, P]. A "pair" is one (token, slot); its flat id is t * P + p.
//
// experts_forward is four to six launches and no host synchronisation (it can be captured in a
// CUDA graph):
//   sort_pairs_kernel     counting sort of the pairs by sub-expert, and the work list (the "plan")
//   skinny_kernel         up-projection with fused SwiGLU, groups of <= 64 pairs (decode)
//   tiled_kernel          the same for larger groups (prefill); launched only when one can exist
//   skinny / tiled        down-projection times the routing weight, one row per pair
//   reduce_slots_kernel   out[t] = sum over slots, in slot order, of the pair rows (no atomics)
//
// Fragment layout, used by both matmul kernels. mma.m16n8k16 wants, in each lane (group g = lane / 4,
// thread c = lane % 4), the A elements of rows g and g + 8 and the B elements of column g at
// k = 2c, 2c + 1, 2c + 8, 2c + 9. A dot product does not care in which order k is summed, so k is
// relabelled: in each 32-wide chunk of k, lane c owns the 8 consecutive elements [8c, 8c + 8) of a row,
// fetched with one 16-byte load (a "piece"), and k16 step s uses elements 4s .. 4s + 3 of the piece.
// A and B are relabelled alike, so every product is unchanged, and row-major [rows, K] operands feed
// the tensor cores without ldmatrix, transposes or swizzles, with nothing but full 16-byte loads.

#include "kernels.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace prism {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunk = 32;            // k per chunk: 4 lanes x one 8-element piece
constexpr int kSortBatch = 8;         // ids a sorting lane loads ahead
constexpr int kSkinnyRows = 64;       // groups of at most this many pairs use skinny_kernel
constexpr int kSkinnyFrags = kSkinnyRows / 16;
constexpr int kSkinnyWarps = 4;       // warps of a skinny block; they split k
constexpr int kSkinnyCols = 32;       // weight rows of a skinny block (paired: 16 gate + 16 up)
constexpr int kSkinnyUnroll = 4;      // chunks a skinny warp has in flight
constexpr int kTileM = 128, kTileN = 128, kStages = 4;  // tiled_kernel: 128 x 128 x 32, 4 stages
constexpr int kTiledThreads = 256;    // 8 warps of 64 x 32
constexpr int kPieces = kChunk / 8;   // 16-byte pieces per shared-memory tile row

template <typename I>
__host__ __device__ constexpr I cdiv(I a, I b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Small device helpers: loads, conversions, the mma instruction.

__device__ __forceinline__ uint4 load_piece(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

// Weights are read once per step: stream them (evict-first) so that activations stay cached.
__device__ __forceinline__ uint4 stream_piece(const void* p) { return __ldcs(static_cast<const uint4*>(p)); }

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t from_float2(float a, float b) {
  uint32_t w;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *reinterpret_cast<__nv_bfloat162*>(&w) = __floats2bfloat162_rn(a, b);
  } else {
    *reinterpret_cast<__half2*>(&w) = __floats2half2_rn(a, b);
  }
  return w;
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(v);
  } else {
    return __float2half(v);
  }
}

// Routing weights are read in their own dtype (no conversion launch): 0 float32, 1 bf16, 2 fp16.
__device__ __forceinline__ float load_route_weight(const void* w, int dtype, int64_t i) {
  if (dtype == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]);
  if (dtype == 2) return __half2float(static_cast<const __half*>(w)[i]);
  return static_cast<const float*>(w)[i];
}

// silu(g) * u. __expf is approximate (~2 ulp); rcp is exact, and gives 0 when exp overflows for very
// negative g, the right limit.
__device__ __forceinline__ float swiglu(float g, float u) { return g * __frcp_rn(1.0f + __expf(-g)) * u; }

// d += A(16x16) B(16x8), float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// k16 step s of the pieces of A rows g, g + 8 and B column g (see the layout note at the top).
template <typename T>
__device__ __forceinline__ void mma_step(float (&d)[4], const uint4& a_lo, const uint4& a_hi, const uint4& b, int s) {
  mma_16816<T>(d, word(a_lo, 2 * s), word(a_hi, 2 * s), word(a_lo, 2 * s + 1), word(a_hi, 2 * s + 1),
               word(b, 2 * s), word(b, 2 * s + 1));
}

__device__ __forceinline__ void cp_async_piece(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");  // 0 source bytes: the piece is zero-filled
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Exclusive prefix sum of data[0, n) in shared memory by the whole block; returns the total.
__device__ int block_exclusive_scan(int* data, int n) {
  __shared__ int warp_base[kWarp];
  __shared__ int total;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const int per_thread = cdiv(n, static_cast<int>(blockDim.x));
  const int lo = min(n, static_cast<int>(threadIdx.x) * per_thread), hi = min(n, lo + per_thread);
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += data[i];
  int incl = sum;
  for (int o = 1; o < kWarp; o <<= 1) {
    const int v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == kWarp - 1) warp_base[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < warps ? warp_base[lane] : 0;
    int w_incl = w;
    for (int o = 1; o < kWarp; o <<= 1) {
      const int v = __shfl_up_sync(kFullMask, w_incl, o);
      if (lane >= o) w_incl += v;
    }
    if (lane < warps) warp_base[lane] = w_incl - w;
    if (lane == kWarp - 1) total = w_incl;
  }
  __syncthreads();
  int run = warp_base[warp] + incl - sum;
  for (int i = lo; i < hi; ++i) {
    const int v = data[i];
    data[i] = run;
    run += v;
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------
// Sorting and planning.

// The work list of a grouped projection: tiles {group, first sorted row, rows, -}. It is built on the
// device, so grids are sized by host-known bounds and blocks without a tile exit at once.
struct Plan {
  int* count = nullptr;  // [0]: skinny tiles, [1]: tiled-kernel tiles; nullptr: no plan wanted
  int4* skinny = nullptr;
  int4* tiled = nullptr;
  int tiled_rows = 0;    // kTileM, or 0 when large groups are cut into skinny tiles instead (gate scores)
};

// Cut every group into tiles, those of one group consecutive. first[g] is the first sorted row of
// group g (first[G] = all valid pairs); scratch holds 2 G ints.
__device__ void build_plan(const int* first, int groups, const Plan& plan, int* scratch) {
  int* n_skinny = scratch;
  int* n_tiled = scratch + groups;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const int rows = first[g + 1] - first[g];
    const bool tiled = plan.tiled_rows > 0 && rows > kSkinnyRows;
    n_skinny[g] = tiled ? 0 : cdiv(rows, kSkinnyRows);
    n_tiled[g] = tiled ? cdiv(rows, plan.tiled_rows) : 0;
  }
  __syncthreads();
  const int total_skinny = block_exclusive_scan(n_skinny, groups);
  const int total_tiled = block_exclusive_scan(n_tiled, groups);
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const int rows = first[g + 1] - first[g];
    const bool tiled = plan.tiled_rows > 0 && rows > kSkinnyRows;
    const int tile_rows = tiled ? plan.tiled_rows : kSkinnyRows;
    int4* tile = tiled ? plan.tiled + n_tiled[g] : plan.skinny + n_skinny[g];
    for (int r = 0; r < rows; r += tile_rows) *tile++ = make_int4(g, first[g] + r, min(tile_rows, rows - r), 0);
  }
  if (threadIdx.x == 0) {
    plan.count[0] = total_skinny;
    plan.count[1] = total_tiled;
  }
}

// Counting sort of the flat pairs by sub-expert in one block: stable, deterministic, no atomics.
// Warp w owns the w-th contiguous slice of the pairs and one counter per bucket (bucket G takes the
// unused slots). Pass 1 counts: __match_any_sync finds the lanes that hold the same id and the lowest
// of them adds their number. A scan over (bucket, warp) gives each warp its first position in each
// bucket; pass 2 puts each pair there plus its rank among the equal ids of lower lanes, so pairs keep
// their flat order inside a group, like torch.sort(stable=True). Optionally writes inv (flat pair ->
// sorted row, -1 if unused) and the plan. One block is enough: at 4096 tokens x 32 slots each warp
// walks 4096 ids twice, a few microseconds against a millisecond of matmuls.
__global__ void sort_pairs_kernel(const int64_t* __restrict__ ids, int pairs, int groups, int64_t* __restrict__ order,
                                  int64_t* __restrict__ offsets, int* __restrict__ inv, Plan plan) {
  extern __shared__ int smem[];
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int buckets = groups + 1;
  int* count = smem;                     // [warps][buckets]
  int* first = smem + warps * buckets;   // [buckets]
  int* scratch = first + buckets;        // [2 groups], for the plan
  for (int i = threadIdx.x; i < warps * buckets; i += blockDim.x) count[i] = 0;
  __syncthreads();

  const int per_warp = cdiv(pairs, warps);
  const int begin = min(pairs, warp * per_warp), end = min(pairs, begin + per_warp);
  // Walk this warp's slice 32 pairs at a time (all lanes together), kSortBatch steps of ids in flight.
  auto for_each_pair = [&](auto&& visit) {
    for (int base = begin; base < end; base += kWarp * kSortBatch) {
      int key[kSortBatch];
#pragma unroll
      for (int b = 0; b < kSortBatch; ++b) {
        const int i = base + b * kWarp + lane;
        const int64_t id = i < end ? ids[i] : -1;
        key[b] = i >= end ? -1 : (id >= 0 && id < groups ? static_cast<int>(id) : groups);
      }
#pragma unroll
      for (int b = 0; b < kSortBatch; ++b) {
        const unsigned peers = __match_any_sync(kFullMask, key[b]);
        visit(key[b], base + b * kWarp + lane, peers, key[b] >= 0 && lane == __ffs(peers) - 1);
      }
    }
  };

  for_each_pair([&](int key, int, unsigned peers, bool leader) {
    if (leader) count[warp * buckets + key] += __popc(peers);
    __syncwarp();
  });
  __syncthreads();
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) {
    int run = 0;
    for (int w = 0; w < warps; ++w) {
      const int c = count[w * buckets + b];
      count[w * buckets + b] = run;
      run += c;
    }
    first[b] = run;
  }
  __syncthreads();
  block_exclusive_scan(first, buckets);
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) offsets[b] = first[b];
  for (int i = threadIdx.x; i < warps * buckets; i += blockDim.x) count[i] += first[i % buckets];
  __syncthreads();

  for_each_pair([&](int key, int i, unsigned peers, bool leader) {
    if (key >= 0) {
      const int pos = count[warp * buckets + key] + __popc(peers & ((1u << lane) - 1));
      if (key < groups) order[pos] = i;
      if (inv != nullptr) inv[i] = key < groups ? pos : -1;
    }
    __syncwarp();
    if (leader) count[warp * buckets + key] += __popc(peers);
    __syncwarp();
  });
  if (plan.count != nullptr) build_plan(first, groups, plan, scratch);
}

// The plan from given offsets (grouped_swiglu / grouped_down called on their own).
__global__ void plan_kernel(const int64_t* __restrict__ offsets, int groups, Plan plan) {
  extern __shared__ int smem[];
  for (int b = threadIdx.x; b <= groups; b += blockDim.x) smem[b] = static_cast<int>(offsets[b]);
  __syncthreads();
  build_plan(smem, groups, plan, smem + groups + 1);
}

// inv[order[r]] = r for every valid sorted row r (inv starts at -1).
__global__ void invert_order_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                    int groups, int rows, int* __restrict__ inv) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r < rows && r < offsets[groups]) inv[order[r]] = r;
}

// ---------------------------------------------------------------------------------------------
// Grouped projections: out[r] = epilogue(A[r] W_g^T) for every sorted row r of a tile of group g.
//   paired (up-projection, gate scores): A[r] = x[order[r] / slots]; W_g = the gate and up rows;
//                                         out[r, j] = silu(gate_j) * up_j
//   plain (down-projection):             A[r] = act[r]; out[r, j] = route_weight[order[r]] * (A W^T)_j

template <typename T>
struct Proj {
  const T* a;               // x [tokens, k] (paired) or act [rows, k] (plain)
  const int64_t* order;     // sorted row -> flat pair id
  int slots;
  const T* w_gate;          // group 0's gate rows (paired) or W [n, k] (plain)
  const T* w_up;            // group 0's up rows (paired)
  int64_t w_group_stride;   // elements from one group's weights to the next
  int n, k;                 // output columns, reduction length
  const void* route_w;      // plain: routing weight of each flat pair
  int route_w_dtype;        // see load_route_weight
};

template <bool kPaired, typename T>
__device__ __forceinline__ const T* a_row(const Proj<T>& p, int r) {
  return kPaired ? p.a + p.order[r] / p.slots * p.k : p.a + static_cast<int64_t>(r) * p.k;
}

// The weight row behind local column `col` of a block whose first output column is n0 (nullptr past
// the end). Paired blocks interleave 16 gate and 16 up rows per 32 columns, so that each lane holds
// gate_j and up_j of the same j in its accumulators and SwiGLU needs no data exchange.
template <bool kPaired, typename T>
__device__ __forceinline__ const T* w_row(const Proj<T>& p, int g, int n0, int col) {
  const int j = kPaired ? n0 + col / 32 * 16 + col % 16 : n0 + col;
  if (j >= p.n) return nullptr;
  const T* w = kPaired && col % 32 >= 16 ? p.w_up : p.w_gate;
  return w + g * p.w_group_stride + static_cast<int64_t>(j) * p.k;
}

// Skinny grouped projection: one block per (tile of <= 64 pairs of one group, 32 weight rows).
// Decode is memory-bound, so the kernel is built around the weight stream: each weight byte is read
// once, 16 bytes per lane straight from global memory into mma fragments, and reused from registers by
// every row of the tile. Tiles are short, so the 4 warps split k instead (more loads in flight for a
// single token); their partial sums meet in shared memory and are added in warp order. Row fragments
// past the tile are skipped: a single token costs one m16 fragment, not four.
template <typename T, typename OutT, bool kPaired>
__global__ void __launch_bounds__(kSkinnyWarps* kWarp)
    skinny_kernel(Proj<T> p, Plan plan, OutT* __restrict__ out) {
  __shared__ const T* a_rows[kSkinnyRows];
  __shared__ float partial[kSkinnyWarps][kSkinnyRows][kSkinnyCols + 1];
  if (static_cast<int>(blockIdx.x) >= plan.count[0]) return;
  const int4 tile = plan.skinny[blockIdx.x];
  const int g = tile.x, r0 = tile.y, rows = tile.z;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, gid = lane / 4, tig = lane % 4;
  const int n0 = blockIdx.y * (kPaired ? kSkinnyCols / 2 : kSkinnyCols);
  if (static_cast<int>(threadIdx.x) < rows) a_rows[threadIdx.x] = a_row<kPaired>(p, r0 + threadIdx.x);
  __syncthreads();

  const T* w[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) w[t] = w_row<kPaired>(p, g, n0, t * 8 + gid);
  float acc[kSkinnyFrags][4][4] = {};
  const int chunks = cdiv(p.k, kChunk);
  for (int c = warp; c < chunks; c += kSkinnyWarps * kSkinnyUnroll) {
    uint4 b[kSkinnyUnroll][4];
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      const int k = (c + u * kSkinnyWarps) * kChunk + 8 * tig;
#pragma unroll
      for (int t = 0; t < 4; ++t) b[u][t] = w[t] != nullptr && k < p.k ? stream_piece(w[t] + k) : uint4{};
    }
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      if (c + u * kSkinnyWarps >= chunks) break;
      const int k = (c + u * kSkinnyWarps) * kChunk + 8 * tig;
#pragma unroll
      for (int f = 0; f < kSkinnyFrags; ++f) {
        if (f * 16 >= rows) break;
        const int lo = f * 16 + gid, hi = lo + 8;
        const uint4 a_lo = lo < rows && k < p.k ? load_piece(a_rows[lo] + k) : uint4{};
        const uint4 a_hi = hi < rows && k < p.k ? load_piece(a_rows[hi] + k) : uint4{};
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int t = 0; t < 4; ++t) mma_step<T>(acc[f][t], a_lo, a_hi, b[u][t], s);
        }
      }
    }
  }

#pragma unroll
  for (int f = 0; f < kSkinnyFrags; ++f) {
    if (f * 16 >= rows) break;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][f * 16 + gid + i / 2 * 8][t * 8 + 2 * tig + i % 2] = acc[f][t][i];
    }
  }
  __syncthreads();
  constexpr int kOut = kPaired ? kSkinnyCols / 2 : kSkinnyCols;
  for (int e = threadIdx.x; e < rows * kOut; e += blockDim.x) {
    const int r = e / kOut, col = e % kOut, j = n0 + col;
    if (j >= p.n) continue;
    float v = 0.0f, up = 0.0f;
#pragma unroll
    for (int w2 = 0; w2 < kSkinnyWarps; ++w2) {
      v += partial[w2][r][col];
      if (kPaired) up += partial[w2][r][col + kSkinnyCols / 2];
    }
    const int64_t row = r0 + r;
    out[row * p.n + j] =
        from_float<OutT>(kPaired ? swiglu(v, up) : v * load_route_weight(p.route_w, p.route_w_dtype, p.order[row]));
  }
}

// Tiled grouped projection for groups of more than 64 pairs (prefill): 128 x 128 output tiles, k in
// chunks of 32 through a 4-stage cp.async pipeline, 8 warps of 64 x 32 on mma.sync m16n8k16 with
// float32 accumulators, the epilogue applied from registers. The cp.async loader gathers the A rows
// (x through order, or act), so no permuted copy of the activations is ever made. Shared tile rows are
// one chunk (64 bytes) and fragments are whole pieces (layout note): bank-conflict free, no swizzle.
// Hopper's wgmma/TMA would be faster still; this kernel is plain sm_80 code that also runs on sm_90.
template <typename T, bool kPaired>
__global__ void __launch_bounds__(kTiledThreads, 2) tiled_kernel(Proj<T> p, Plan plan, T* __restrict__ out) {
  extern __shared__ uint4 tiles[];  // [kStages][kTileM + kTileN rows][kPieces]
  if (static_cast<int>(blockIdx.x) >= plan.count[1]) return;
  const int4 tile = plan.tiled[blockIdx.x];
  const int g = tile.x, r0 = tile.y, rows = tile.z;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, gid = lane / 4, tig = lane % 4;
  const int wm = warp / 4, wn = warp % 4;
  const int n0 = blockIdx.y * (kPaired ? kTileN / 2 : kTileN);

  // Each thread copies the same piece column q of two A rows and two B rows at every stage.
  constexpr int kRowsPerPass = kTiledThreads / kPieces;
  const int q = threadIdx.x % kPieces;
  int ld_row[2];
  const T* a_src[2];
  const T* b_src[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    ld_row[i] = threadIdx.x / kPieces + i * kRowsPerPass;
    a_src[i] = ld_row[i] < rows ? a_row<kPaired>(p, r0 + ld_row[i]) : nullptr;
    b_src[i] = w_row<kPaired>(p, g, n0, ld_row[i]);
  }
  auto load_stage = [&](int stage, int chunk) {
    const int k = chunk * kChunk + 8 * q;
    uint4* s = tiles + stage * (kTileM + kTileN) * kPieces;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool a_ok = a_src[i] != nullptr && k < p.k, b_ok = b_src[i] != nullptr && k < p.k;
      cp_async_piece(s + ld_row[i] * kPieces + q, a_ok ? a_src[i] + k : p.a, a_ok);
      cp_async_piece(s + (kTileM + ld_row[i]) * kPieces + q, b_ok ? b_src[i] + k : p.w_gate, b_ok);
    }
  };

  float acc[4][4][4] = {};
  const int chunks = cdiv(p.k, kChunk);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < chunks) load_stage(s, s);
    cp_async_commit();
  }
  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk c has landed, and every warp is done with the stage refilled below
    if (c + kStages - 1 < chunks) load_stage((c + kStages - 1) % kStages, c + kStages - 1);
    cp_async_commit();
    const uint4* s = tiles + (c % kStages) * (kTileM + kTileN) * kPieces;
    uint4 b[4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) b[nt] = s[(kTileM + wn * 32 + nt * 8 + gid) * kPieces + tig];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      const uint4 a_lo = s[(wm * 64 + mt * 16 + gid) * kPieces + tig];
      const uint4 a_hi = s[(wm * 64 + mt * 16 + gid + 8) * kPieces + tig];
#pragma unroll
      for (int step = 0; step < 2; ++step) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_step<T>(acc[mt][nt], a_lo, a_hi, b[nt], step);
      }
    }
  }

#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm * 64 + mt * 16 + gid + 8 * h;
      if (r >= rows) continue;
      const int64_t row = r0 + r;
      if (kPaired) {  // accumulators nt = 0, 1 are gate columns, nt = 2, 3 the matching up columns
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int j = n0 + wn * 16 + nt * 8 + 2 * tig;
          if (j < p.n) {
            *reinterpret_cast<uint32_t*>(out + row * p.n + j) =
                from_float2<T>(swiglu(acc[mt][nt][2 * h], acc[mt][nt + 2][2 * h]),
                               swiglu(acc[mt][nt][2 * h + 1], acc[mt][nt + 2][2 * h + 1]));
          }
        }
      } else {
        const float rw = load_route_weight(p.route_w, p.route_w_dtype, p.order[row]);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int j = n0 + wn * 32 + nt * 8 + 2 * tig;
          if (j < p.n) {
            *reinterpret_cast<uint32_t*>(out + row * p.n + j) =
                from_float2<T>(acc[mt][nt][2 * h] * rw, acc[mt][nt][2 * h + 1] * rw);
          }
        }
      }
    }
  }
}

// out[t] = sum over slots s, in order, of the down row of pair (t, s): the fixed-order reduction that
// makes the result deterministic without atomics. Eight hidden units per thread, 16-byte loads.
template <typename T>
__global__ void reduce_slots_kernel(const T* __restrict__ pair_rows, const int* __restrict__ inv, int slots,
                                    int hidden, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int h = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (h >= hidden) return;
  float acc[8] = {};
  for (int s = 0; s < slots; ++s) {
    const int r = inv[t * slots + s];
    if (r < 0) continue;
    const uint4 v = load_piece(pair_rows + static_cast<int64_t>(r) * hidden + h);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = to_float2<T>(word(v, i));
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  uint4 o;
  o.x = from_float2<T>(acc[0], acc[1]);
  o.y = from_float2<T>(acc[2], acc[3]);
  o.z = from_float2<T>(acc[4], acc[5]);
  o.w = from_float2<T>(acc[6], acc[7]);
  *reinterpret_cast<uint4*>(out + t * hidden + h) = o;
}

// scores[pair, q] = mean over the s gate neurons of sub-expert q of |silu(g) u|, summed in neuron
// order; act holds each sorted pair's neurons. A pair whose expert id is out of range gets NaN.
__global__ void score_mean_kernel(const float* __restrict__ act, const int* __restrict__ inv, int64_t pairs,
                                  int n_sub, int per_sub, float* __restrict__ scores) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= pairs * n_sub) return;
  const int r = inv[e / n_sub];
  const int q = static_cast<int>(e % n_sub);
  float sum = 0.0f;
  if (r >= 0) {
    for (int i = 0; i < per_sub; ++i) sum += fabsf(act[(static_cast<int64_t>(r) * n_sub + q) * per_sub + i]);
  }
  scores[e] = r >= 0 ? sum / per_sub : __int_as_float(0x7fc00000);
}

// ---------------------------------------------------------------------------------------------
// Host side.

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  TORCH_CHECK(t.defined() && t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the input is on ", device);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_matrix(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device,
                  at::ScalarType dtype) {
  check_tensor(t, name, dim, device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " like the activations, got ", t.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check_activations(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined() && x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, name,
              " must be bfloat16 or float16 (the torch reference path handles other dtypes), got ", x.scalar_type());
  check_matrix(x, name, 2, x.device(), x.scalar_type());
  TORCH_CHECK(x.size(1) % 8 == 0, name, ": the row length must be a multiple of 8 (16-byte rows), got ", x.size(1));
}

void check_ids(const at::Tensor& t, const char* name, const at::Device& device) {
  check_tensor(t, name, 2, device);
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.numel() < INT_MAX, name, " has too many entries");
}

void check_sorted(const at::Tensor& order, const at::Tensor& offsets, int64_t groups, const at::Device& device) {
  check_tensor(order, "order", 1, device);
  check_tensor(offsets, "offsets", 1, device);
  TORCH_CHECK(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong,
              "order and offsets must be int64");
  TORCH_CHECK(offsets.size(0) == groups + 1, "offsets must have ", groups + 1, " entries, got ", offsets.size(0));
  TORCH_CHECK(order.numel() < INT_MAX, "order has too many entries");
}

int route_weight_dtype(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "weights must be float32, bfloat16 or float16, got ", w.scalar_type());
  }
  return 0;
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(__half{});
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mut_ptr(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// Opt in to more than 48 KB of dynamic shared memory when needed.
template <typename K>
void allow_shared_memory(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// A plan's storage: the device fills it; the host knows how many tiles there can be at most.
struct PlanBuffer {
  at::Tensor storage;
  Plan plan;
  int max_skinny = 0, max_tiled = 0;
};

PlanBuffer make_plan_buffer(int64_t pairs, int64_t groups, bool tiled, const at::Device& device) {
  const int64_t active = std::min(groups, pairs);
  PlanBuffer b;
  // Skinny: one tile per group of <= 64 pairs, or ceil(rows / 64) tiles per group without tiled_kernel.
  b.max_skinny = static_cast<int>(tiled ? active : active + pairs / kSkinnyRows + 1);
  // Tiled: ceil(rows / 128) per group of more than 64 pairs, of which there are at most pairs / 65.
  b.max_tiled = tiled && pairs > kSkinnyRows
                    ? static_cast<int>(pairs / kTileM + std::min(groups, pairs / (kSkinnyRows + 1)) + 1)
                    : 0;
  b.storage = at::empty({4 + 4 * (b.max_skinny + b.max_tiled)}, at::TensorOptions().dtype(at::kInt).device(device));
  b.plan.count = b.storage.data_ptr<int>();
  b.plan.skinny = reinterpret_cast<int4*>(b.plan.count + 4);
  b.plan.tiled = b.plan.skinny + b.max_skinny;
  b.plan.tiled_rows = tiled ? kTileM : 0;
  return b;
}

struct Sorted {
  at::Tensor order, offsets, inv;
  PlanBuffer plan;
};

// Launch sort_pairs_kernel on ids [T, P] (T * P > 0). with_plan: also the plan (tiled or skinny-only).
Sorted sort_ids(const at::Tensor& ids, int64_t groups, bool with_inv, bool with_plan, bool tiled) {
  const int64_t pairs = ids.numel();
  const auto long_opts = ids.options().dtype(at::kLong);
  Sorted s;
  s.order = at::empty({pairs}, long_opts);
  s.offsets = at::empty({groups + 1}, long_opts);
  if (with_inv) s.inv = at::empty({pairs}, long_opts.dtype(at::kInt));
  if (with_plan) s.plan = make_plan_buffer(pairs, groups, tiled, ids.device());

  const int64_t buckets = groups + 1;
  int optin_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, ids.get_device()));
  const int64_t optin_ints = optin_bytes / static_cast<int64_t>(sizeof(int));
  // Per-warp counters, first and the plan scratch; the scan's static shared memory is kept aside.
  const int64_t max_warps = (optin_ints - 64) / buckets - 3;
  TORCH_CHECK(max_warps >= 1, "too many groups (", groups, ") for the one-block sort");
  const int64_t wanted = std::max<int64_t>(4, cdiv<int64_t>(pairs, 256));  // ~256 pairs a warp
  const int warps = static_cast<int>(std::min<int64_t>({32, max_warps, wanted}));
  const size_t smem = static_cast<size_t>(warps + 3) * buckets * sizeof(int);
  allow_shared_memory(sort_pairs_kernel, smem);
  sort_pairs_kernel<<<1, warps * kWarp, smem, c10::cuda::getCurrentCUDAStream()>>>(
      ids.data_ptr<int64_t>(), static_cast<int>(pairs), static_cast<int>(groups), s.order.data_ptr<int64_t>(),
      s.offsets.data_ptr<int64_t>(), with_inv ? s.inv.data_ptr<int>() : nullptr, s.plan.plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

// The plan of grouped_swiglu / grouped_down called on their own, from the offsets.
PlanBuffer plan_from_offsets(const at::Tensor& offsets, int64_t rows, int64_t groups) {
  PlanBuffer b = make_plan_buffer(rows, groups, true, offsets.device());
  const size_t smem = static_cast<size_t>(3 * groups + 1) * sizeof(int);
  allow_shared_memory(plan_kernel, smem);
  plan_kernel<<<1, 1024, smem, c10::cuda::getCurrentCUDAStream()>>>(offsets.data_ptr<int64_t>(),
                                                                    static_cast<int>(groups), b.plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return b;
}

// Launch the skinny and (when a group can exceed 64 pairs) the tiled kernel of one projection.
template <typename T, bool kPaired>
void run_projection(const Proj<T>& p, const PlanBuffer& b, T* out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int skinny_cols = cdiv(p.n, kPaired ? kSkinnyCols / 2 : kSkinnyCols);
  skinny_kernel<T, T, kPaired><<<dim3(b.max_skinny, skinny_cols), kSkinnyWarps * kWarp, 0, stream>>>(p, b.plan, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (b.max_tiled == 0) return;
  const size_t smem = static_cast<size_t>(kStages) * (kTileM + kTileN) * kPieces * sizeof(uint4);
  allow_shared_memory(tiled_kernel<T, kPaired>, smem);
  const int tiled_cols = cdiv(p.n, kPaired ? kTileN / 2 : kTileN);
  tiled_kernel<T, kPaired><<<dim3(b.max_tiled, tiled_cols), kTiledThreads, smem, stream>>>(p, b.plan, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
Proj<T> up_projection(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& order, int64_t slots) {
  const int64_t width = gate_up.size(1) / 2, hidden = gate_up.size(2);
  Proj<T> p{};
  p.a = ptr<T>(x);
  p.order = order.data_ptr<int64_t>();
  p.slots = static_cast<int>(slots);
  p.w_gate = ptr<T>(gate_up);
  p.w_up = p.w_gate + width * hidden;
  p.w_group_stride = 2 * width * hidden;
  p.n = static_cast<int>(width);
  p.k = static_cast<int>(hidden);
  return p;
}

template <typename T>
Proj<T> down_projection(const at::Tensor& act, const at::Tensor& down, const at::Tensor& order,
                        const at::Tensor& weights) {
  Proj<T> p{};
  p.a = ptr<T>(act);
  p.order = order.data_ptr<int64_t>();
  p.slots = static_cast<int>(weights.size(1));
  p.w_gate = ptr<T>(down);
  p.w_group_stride = down.size(1) * down.size(2);
  p.n = static_cast<int>(down.size(1));
  p.k = static_cast<int>(down.size(2));
  p.route_w = weights.data_ptr();
  p.route_w_dtype = route_weight_dtype(weights);
  return p;
}

template <typename T>
void reduce_slots(const at::Tensor& pair_rows, const at::Tensor& inv, int64_t slots, at::Tensor& out) {
  const int64_t tokens = out.size(0), hidden = out.size(1);
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(cdiv<int64_t>(hidden / 8, kThreads)));
  reduce_slots_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ptr<T>(pair_rows), inv.data_ptr<int>(), static_cast<int>(slots), static_cast<int>(hidden), mut_ptr<T>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_experts(const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& x) {
  check_matrix(gate_up, "gate_up", 3, x.device(), x.scalar_type());
  check_matrix(down, "down", 3, x.device(), x.scalar_type());
  const int64_t groups = gate_up.size(0), width = gate_up.size(1) / 2, hidden = x.size(1);
  TORCH_CHECK(groups >= 1 && gate_up.size(1) == 2 * width && width % 8 == 0 && gate_up.size(2) == hidden,
              "gate_up must be [G, 2 Is, H] with Is a multiple of 8 and H = ", hidden, ", got ", gate_up.sizes());
  TORCH_CHECK(down.size(0) == groups && down.size(1) == hidden && down.size(2) == width,
              "down must be [G, H, Is] = [", groups, ", ", hidden, ", ", width, "], got ", down.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sort_pairs(const at::Tensor& indices, int64_t num_groups) {
  TORCH_CHECK(indices.defined() && indices.is_cuda(), "indices must be a CUDA tensor");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.is_contiguous(), "indices must be contiguous");
  TORCH_CHECK(indices.numel() < INT_MAX, "indices has too many entries");
  TORCH_CHECK(num_groups >= 1 && num_groups < INT_MAX, "num_groups must be positive, got ", num_groups);
  const c10::cuda::CUDAGuard guard(indices.device());
  if (indices.numel() == 0) {
    return {at::empty({0}, indices.options()), at::zeros({num_groups + 1}, indices.options())};
  }
  Sorted s = sort_ids(indices, num_groups, false, false, false);
  const int64_t valid = s.offsets[num_groups].item<int64_t>();  // one host sync, as in the reference
  return {s.order.narrow(0, 0, valid), s.offsets};
}

at::Tensor grouped_swiglu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& order,
                          const at::Tensor& offsets, int64_t slots) {
  check_activations(x, "x");
  check_matrix(gate_up, "gate_up", 3, x.device(), x.scalar_type());
  TORCH_CHECK(gate_up.size(1) % 16 == 0 && gate_up.size(2) == x.size(1),
              "gate_up must be [G, 2 Is, H] with Is a multiple of 8 and H = ", x.size(1), ", got ", gate_up.sizes());
  check_sorted(order, offsets, gate_up.size(0), x.device());
  TORCH_CHECK(slots >= 1, "slots must be positive");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = order.size(0);
  at::Tensor act = at::empty({rows, gate_up.size(1) / 2}, x.options());
  if (rows == 0) return act;
  const PlanBuffer plan = plan_from_offsets(offsets, rows, gate_up.size(0));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_projection<T, true>(up_projection<T>(x, gate_up, order, slots), plan, mut_ptr<T>(act));
  });
  return act;
}

at::Tensor grouped_down(const at::Tensor& act, const at::Tensor& down, const at::Tensor& order,
                        const at::Tensor& offsets, const at::Tensor& weights, int64_t num_tokens) {
  check_activations(act, "act");
  check_matrix(down, "down", 3, act.device(), act.scalar_type());
  TORCH_CHECK(down.size(2) == act.size(1) && down.size(1) % 8 == 0,
              "down must be [G, H, Is] with Is = ", act.size(1), " and H a multiple of 8, got ", down.sizes());
  check_sorted(order, offsets, down.size(0), act.device());
  check_tensor(weights, "weights", 2, act.device());
  route_weight_dtype(weights);
  TORCH_CHECK(weights.size(0) == num_tokens, "weights must be [num_tokens, P], got ", weights.sizes());
  TORCH_CHECK(order.size(0) == act.size(0), "order and act must have one row per sorted pair");
  const c10::cuda::CUDAGuard guard(act.device());
  const int64_t slots = weights.size(1), rows = order.size(0), groups = down.size(0);
  at::Tensor out = at::empty({num_tokens, down.size(1)}, act.options());
  if (num_tokens * slots == 0) return out.zero_();
  at::Tensor inv = at::full({num_tokens * slots}, -1, act.options().dtype(at::kInt));
  if (rows > 0) {
    invert_order_kernel<<<cdiv<int64_t>(rows, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), static_cast<int>(groups), static_cast<int>(rows),
        inv.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dispatch_dtype(act.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::Tensor pair_rows = at::empty({rows, down.size(1)}, act.options());
    if (rows > 0) {
      const PlanBuffer plan = plan_from_offsets(offsets, rows, groups);
      run_projection<T, false>(down_projection<T>(act, down, order, weights), plan, mut_ptr<T>(pair_rows));
    }
    reduce_slots<T>(pair_rows, inv, slots, out);
  });
  return out;
}

at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                           const at::Tensor& indices, const at::Tensor& weights) {
  check_activations(x, "x");
  check_experts(gate_up, down, x);
  check_ids(indices, "indices", x.device());
  check_tensor(weights, "weights", 2, x.device());
  route_weight_dtype(weights);
  TORCH_CHECK(indices.size(0) == x.size(0) && weights.sizes() == indices.sizes(),
              "indices and weights must both be [T, P] with T = ", x.size(0), ", got ", indices.sizes(), " and ",
              weights.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t groups = gate_up.size(0), pairs = indices.numel();
  at::Tensor out = at::empty_like(x);
  if (pairs == 0) return out.zero_();
  // Buffers are sized for every pair (unused slots included), so nothing waits for the valid count.
  const Sorted s = sort_ids(indices, groups, true, true, true);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::Tensor act = at::empty({pairs, gate_up.size(1) / 2}, x.options());
    run_projection<T, true>(up_projection<T>(x, gate_up, s.order, indices.size(1)), s.plan, mut_ptr<T>(act));
    at::Tensor pair_rows = at::empty({pairs, x.size(1)}, x.options());
    run_projection<T, false>(down_projection<T>(act, down, s.order, weights), s.plan, mut_ptr<T>(pair_rows));
    reduce_slots<T>(pair_rows, s.inv, indices.size(1), out);
  });
  return out;
}

at::Tensor gate_scores(const at::Tensor& x, const at::Tensor& gate_w, const at::Tensor& up_w,
                       const at::Tensor& expert_idx, int64_t n_sub) {
  check_activations(x, "x");
  check_matrix(gate_w, "gate_w", 3, x.device(), x.scalar_type());
  check_matrix(up_w, "up_w", 3, x.device(), x.scalar_type());
  TORCH_CHECK(gate_w.sizes() == up_w.sizes() && gate_w.size(2) == x.size(1),
              "gate_w and up_w must both be [E, N * s, H] with H = ", x.size(1), ", got ", gate_w.sizes(), " and ",
              up_w.sizes());
  check_ids(expert_idx, "expert_idx", x.device());
  TORCH_CHECK(expert_idx.size(0) == x.size(0), "expert_idx must be [T, k] with T = ", x.size(0));
  const int64_t experts = gate_w.size(0), neurons = gate_w.size(1);
  TORCH_CHECK(n_sub >= 1 && neurons % n_sub == 0, "the ", neurons, " gate neurons do not split into ", n_sub,
              " sub-experts");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t pairs = expert_idx.numel();
  at::Tensor scores = at::empty({x.size(0), expert_idx.size(1), n_sub}, x.options().dtype(at::kFloat));
  if (pairs == 0) return scores;
  const Sorted s = sort_ids(expert_idx, experts, true, true, false);
  at::Tensor act = at::empty({pairs, neurons}, scores.options());
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Proj<T> p{};
    p.a = ptr<T>(x);
    p.order = s.order.data_ptr<int64_t>();
    p.slots = static_cast<int>(expert_idx.size(1));
    p.w_gate = ptr<T>(gate_w);
    p.w_up = ptr<T>(up_w);
    p.w_group_stride = neurons * x.size(1);
    p.n = static_cast<int>(neurons);
    p.k = static_cast<int>(x.size(1));
    const dim3 grid(s.plan.max_skinny, cdiv<int64_t>(neurons, kSkinnyCols / 2));
    skinny_kernel<T, float, true><<<grid, kSkinnyWarps * kWarp, 0, c10::cuda::getCurrentCUDAStream()>>>(
        p, s.plan.plan, act.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  score_mean_kernel<<<cdiv<int64_t>(pairs * n_sub, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      act.data_ptr<float>(), s.inv.data_ptr<int>(), pairs, static_cast<int>(n_sub),
      static_cast<int>(neurons / n_sub), scores.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scores;
}

}  // namespace prism
