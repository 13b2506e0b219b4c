// Matrix products against a weight stored as Hugging Face does, `w [n, k]` row-major (one row
// per output feature): out[m, n] = sum_k x[m, k] * w[n, k], bf16 inputs, f32 accumulation.
//
// - matvec_*: decode (one row). Memory-bound: every weight byte is read once, in 16-byte loads,
//   MATVEC_UNROLL loads in flight per lane; one warp per output row. Each block stages the input
//   row in shared memory, and the staging is where decode's small ops happen: the RMSNorm of the
//   residual stream (matvec_rms_norm_*) or the SwiGLU of gate and up (matvec_swiglu_*); the
//   residual add happens in the store (*_add_f32). So a decode layer needs no norm, SwiGLU, add
//   or copy launches.
// - matmul_mma_*: prefill and the no-cache recompute (many rows). Tensor cores (mma.sync
//   m16n8k16), 128x128x32 block tiles staged in shared memory by cp.async in MATMUL_STAGES
//   buffers, so the copies of tile k+1 and k+2 overlap the products of tile k.
// k % 8 == 0 everywhere (16-byte rows); m, n and k need not be multiples of any tile.
//
// Weights of f16 / f32 checkpoints are bf16 pairs `[n, 2k]` (the bf16 value, then its rounding
// error; see duplicate_columns_bf16): `weight_cols` is then 2 * k and a matvec stages its input
// twice side by side, so that one dot product sums both halves.
#include "common.cuh"
#include "activation.cuh"
#include "mma_tile.cuh"
#include "norm.cuh"

// Where a product lands: out[index] = value (bf16 or f32), or out[index] += value (the f32
// residual stream; each index is written by one thread, so the add needs no atomics).
struct StoreBf16 {
    bf16* out;
    __device__ __forceinline__ void operator()(uint64_t index, float value) const {
        out[index] = f32_to_bf16(value);
    }
};

struct StoreF32 {
    float* out;
    __device__ __forceinline__ void operator()(uint64_t index, float value) const {
        out[index] = value;
    }
};

struct AddF32 {
    float* out;
    __device__ __forceinline__ void operator()(uint64_t index, float value) const {
        out[index] += value;
    }
};

// ---------------------------------------------------------------------------------------------
// Decode: matrix-vector.

#define MATVEC_THREADS 256
#define MATVEC_WARPS (MATVEC_THREADS / WARP_SIZE)
// 16-byte weight loads in flight per lane: 8 x 32 lanes x 16 bytes = 4 KiB, a whole 2048-wide
// bf16 row (Llama-3.2-1B's hidden size) per warp in one round trip to memory.
#define MATVEC_UNROLL 8
static_assert(MATVEC_UNROLL * WARP_SIZE * 8 == 2048, "one round trip covers a 2048-wide row");

__device__ __forceinline__ float dot_bf16x8(uint4 a, uint4 b, float acc) {
    acc = fmaf(bf16x2_lo_to_f32(a.x), bf16x2_lo_to_f32(b.x), acc);
    acc = fmaf(bf16x2_hi_to_f32(a.x), bf16x2_hi_to_f32(b.x), acc);
    acc = fmaf(bf16x2_lo_to_f32(a.y), bf16x2_lo_to_f32(b.y), acc);
    acc = fmaf(bf16x2_hi_to_f32(a.y), bf16x2_hi_to_f32(b.y), acc);
    acc = fmaf(bf16x2_lo_to_f32(a.z), bf16x2_lo_to_f32(b.z), acc);
    acc = fmaf(bf16x2_hi_to_f32(a.z), bf16x2_hi_to_f32(b.z), acc);
    acc = fmaf(bf16x2_lo_to_f32(a.w), bf16x2_lo_to_f32(b.w), acc);
    acc = fmaf(bf16x2_hi_to_f32(a.w), bf16x2_hi_to_f32(b.w), acc);
    return acc;
}

// The inputs a matvec stages: `prepare` runs once per block (every thread calls it), then
// `vector(v)` gives the v-th 8 bf16 of the input row.

// x as stored.
struct MatvecInputBf16 {
    const bf16* x;  // [k]
    __device__ __forceinline__ void prepare(int) {}
    __device__ __forceinline__ uint4 vector(int v) const {
        return reinterpret_cast<const uint4*>(x)[v];
    }
};

// rmsnorm(residual) * weight, exactly as rms_norm_f32_to_bf16 rounds it: every block computes
// the row's mean square itself (k * 4 bytes from L2) instead of waiting for a norm launch.
struct MatvecInputRmsNorm {
    const float* residual;  // [k]
    const float* weight;    // [k]
    float eps;
    float scale;
    __device__ __forceinline__ void prepare(int k) {
        scale = rms_norm_scale<MATVEC_THREADS>(residual, k, eps);
    }
    __device__ __forceinline__ uint4 vector(int v) const {
        const float4* x4 = reinterpret_cast<const float4*>(residual);
        const float4* w4 = reinterpret_cast<const float4*>(weight);
        const uint2 low = rms_norm_bf16x4(x4[2 * v], w4[2 * v], scale);
        const uint2 high = rms_norm_bf16x4(x4[2 * v + 1], w4[2 * v + 1], scale);
        return make_uint4(low.x, low.y, high.x, high.y);
    }
};

// silu(gate) * up, exactly as swiglu_bf16 rounds it.
struct MatvecInputSwiglu {
    const bf16* gate;  // [k]
    const bf16* up;    // [k]
    __device__ __forceinline__ void prepare(int) {}
    __device__ __forceinline__ uint4 vector(int v) const {
        return swiglu_bf16x8(reinterpret_cast<const uint4*>(gate)[v], reinterpret_cast<const uint4*>(up)[v]);
    }
};

// Row `row` of the sequence of rows of w0, then w1, then w2 (warp-uniform choice).
__device__ __forceinline__ const uint4* matvec_weight_row(int row, const bf16* w0, int n0, const bf16* w1, int n1,
                                                          const bf16* w2, int weight_cols) {
    const bf16* w = row < n0 ? w0 : (row < n0 + n1 ? w1 : w2);
    const int r = row < n0 ? row : (row < n0 + n1 ? row - n0 : row - n0 - n1);
    return reinterpret_cast<const uint4*>(w + (uint64_t)r * weight_cols);
}

// One round trip: this lane's MATVEC_UNROLL vectors of the weight row from vector `first`
// (zeros past the row's end).
__device__ __forceinline__ void matvec_load(uint4 (&w_vec)[MATVEC_UNROLL], const uint4* __restrict__ w_row,
                                            int first, int vectors) {
#pragma unroll
    for (int u = 0; u < MATVEC_UNROLL; ++u) {
        const int v = first + u * WARP_SIZE;
        w_vec[u] = v < vectors ? w_row[v] : make_uint4(0u, 0u, 0u, 0u);
    }
}

// Up to three weights that share the input (q, k, v; gate, up) run as one sequence of rows:
// those of w0, then w1, then w2, so one launch covers them and small matrices (k, v at 512
// rows) do not leave SMs idle. The input is staged once per block in dynamic shared memory
// (weight_cols * 2 bytes); warps then stride over the rows, so a grid of the resident blocks
// only (the launch sizes it by the occupancy API) still covers every row. Each warp requests
// its first row's weights before the block stages the input, so that the staging (and a norm's
// reduction) overlaps their trip to memory; in a programmatic launch they are requested before
// the wait for the previous kernel, so they also overlap its tail.
template <typename Input, typename Output>
__device__ __forceinline__ void matvec(Input input, int k, int weight_cols, const bf16* __restrict__ w0, Output out0,
                                       int n0, const bf16* __restrict__ w1, Output out1, int n1,
                                       const bf16* __restrict__ w2, Output out2, int n2) {
    DYNAMIC_SHARED(uint4, x_shared);  // [weight_cols / 8]
    const int lane = threadIdx.x % WARP_SIZE;
    const int vectors = weight_cols / 8;
    const int warps_in_grid = gridDim.x * MATVEC_WARPS;
    const int total_rows = n0 + n1 + n2;
    int row = blockIdx.x * MATVEC_WARPS + threadIdx.x / WARP_SIZE;
    uint4 w_vec[MATVEC_UNROLL];
    if (row < total_rows) {
        matvec_load(w_vec, matvec_weight_row(row, w0, n0, w1, n1, w2, weight_cols), lane, vectors);
    }
    // Only weights were read so far: the input and the outputs are other kernels' too.
    grid_dependency_wait();
    grid_dependents_launch();

    input.prepare(k);
    const int input_vectors = k / 8;
    for (int v = threadIdx.x; v < input_vectors; v += MATVEC_THREADS) {
        const uint4 value = input.vector(v);
        x_shared[v] = value;
        if (weight_cols > k) {
            x_shared[input_vectors + v] = value;
        }
    }
    __syncthreads();

    for (; row < total_rows; row += warps_in_grid) {
        const uint4* w_row = matvec_weight_row(row, w0, n0, w1, n1, w2, weight_cols);
        float acc = 0.0f;
        for (int chunk = 0; chunk < vectors; chunk += WARP_SIZE * MATVEC_UNROLL) {
            if (chunk > 0) {
                matvec_load(w_vec, w_row, chunk + lane, vectors);
            }
#pragma unroll
            for (int u = 0; u < MATVEC_UNROLL; ++u) {
                const int v = chunk + lane + u * WARP_SIZE;
                if (v < vectors) {
                    acc = dot_bf16x8(w_vec[u], x_shared[v], acc);
                }
            }
        }
        acc = warp_reduce_sum(acc);
        if (lane == 0) {
            const Output& out = row < n0 ? out0 : (row < n0 + n1 ? out1 : out2);
            out(row < n0 ? row : (row < n0 + n1 ? row - n0 : row - n0 - n1), acc);
        }
        if (row + warps_in_grid < total_rows) {
            matvec_load(w_vec, matvec_weight_row(row + warps_in_grid, w0, n0, w1, n1, w2, weight_cols), lane,
                        vectors);
        }
    }
}

// Every matvec_* kernel: grid of at most the blocks resident at once, block MATVEC_THREADS,
// dynamic shared weight_cols * 2 bytes; weight_cols is k, or 2 * k for weights stored as bf16
// pairs. Unused slots of the three-weight kernels have n_i = 0 and null pointers.

// out_i[n_i] = w_i[n_i, :] . x for i < 3.
extern "C" __global__ void matvec_bf16(const bf16* x,   // [k]
                                       const bf16* w0,  // [n0, weight_cols]
                                       bf16* out0,      // [n0]
                                       int n0,
                                       const bf16* w1,  // [n1, weight_cols] or null
                                       bf16* out1,      // [n1] or null
                                       int n1,
                                       const bf16* w2,  // [n2, weight_cols] or null
                                       bf16* out2,      // [n2] or null
                                       int n2, int k, int weight_cols) {
    matvec(MatvecInputBf16{x}, k, weight_cols, w0, StoreBf16{out0}, n0, w1, StoreBf16{out1}, n1, w2,
           StoreBf16{out2}, n2);
}

// out[n] = w[n, :] . x in f32.
extern "C" __global__ void matvec_bf16_out_f32(const bf16* x,  // [k]
                                               const bf16* w,  // [n, weight_cols]
                                               float* out,     // [n]
                                               int n, int k, int weight_cols) {
    matvec(MatvecInputBf16{x}, k, weight_cols, w, StoreF32{out}, n, nullptr, StoreF32{nullptr}, 0, nullptr,
           StoreF32{nullptr}, 0);
}

// residual[n] += w[n, :] . x: a sublayer's output projection (o_proj) added to the residual
// stream.
extern "C" __global__ void matvec_bf16_add_f32(const bf16* x,    // [k]
                                               const bf16* w,    // [n, weight_cols]
                                               float* residual,  // [n]
                                               int n, int k, int weight_cols) {
    matvec(MatvecInputBf16{x}, k, weight_cols, w, AddF32{residual}, n, nullptr, AddF32{nullptr}, 0, nullptr,
           AddF32{nullptr}, 0);
}

// out_i[n_i] = w_i[n_i, :] . (rmsnorm(residual) * norm_weight) for i < 3: a sublayer's norm
// and its projections (q, k, v; gate, up).
extern "C" __global__ void matvec_rms_norm_bf16(const float* residual,     // [k]
                                                const float* norm_weight,  // [k]
                                                float eps,
                                                const bf16* w0,  // [n0, weight_cols]
                                                bf16* out0,      // [n0]
                                                int n0,
                                                const bf16* w1,  // [n1, weight_cols] or null
                                                bf16* out1,      // [n1] or null
                                                int n1,
                                                const bf16* w2,  // [n2, weight_cols] or null
                                                bf16* out2,      // [n2] or null
                                                int n2, int k, int weight_cols) {
    matvec(MatvecInputRmsNorm{residual, norm_weight, eps, 0.0f}, k, weight_cols, w0, StoreBf16{out0}, n0, w1,
           StoreBf16{out1}, n1, w2, StoreBf16{out2}, n2);
}

// out[n] = w[n, :] . (rmsnorm(residual) * norm_weight) in f32: the final norm and the logits.
extern "C" __global__ void matvec_rms_norm_bf16_out_f32(const float* residual,     // [k]
                                                        const float* norm_weight,  // [k]
                                                        float eps,
                                                        const bf16* w,  // [n, weight_cols]
                                                        float* out,     // [n]
                                                        int n, int k, int weight_cols) {
    matvec(MatvecInputRmsNorm{residual, norm_weight, eps, 0.0f}, k, weight_cols, w, StoreF32{out}, n, nullptr,
           StoreF32{nullptr}, 0, nullptr, StoreF32{nullptr}, 0);
}

// residual[n] += w[n, :] . (silu(gate) * up): the MLP's SwiGLU and down projection added to the
// residual stream.
extern "C" __global__ void matvec_swiglu_bf16_add_f32(const bf16* gate,  // [k]
                                                      const bf16* up,    // [k]
                                                      const bf16* w,     // [n, weight_cols]
                                                      float* residual,   // [n]
                                                      int n, int k, int weight_cols) {
    matvec(MatvecInputSwiglu{gate, up}, k, weight_cols, w, AddF32{residual}, n, nullptr, AddF32{nullptr}, 0,
           nullptr, AddF32{nullptr}, 0);
}

// ---------------------------------------------------------------------------------------------
// Prefill: tensor-core matrix-matrix.

#define MATMUL_BM 128
#define MATMUL_BN 128
#define MATMUL_BK 32
#define MATMUL_STAGES 3
#define MATMUL_THREADS 256
// 8 warps as 2 (m) x 4 (n); each warp owns a 64 x 32 tile of the output: 4 x 4 mma tiles.
#define MATMUL_WARP_M 64
#define MATMUL_WARP_N 32
#define MATMUL_CHUNKS_PER_ROW (MATMUL_BK / 8)
#define MATMUL_STAGE_ELEMS ((MATMUL_BM + MATMUL_BN) * MATMUL_BK)
// Dynamic shared memory of a launch: MATMUL_STAGES stages of bf16.
#define MATMUL_SHARED_BYTES (MATMUL_STAGES * MATMUL_STAGE_ELEMS * 2)

// Stage buffer: a tile [MATMUL_BM][MATMUL_BK] then a w tile [MATMUL_BN][MATMUL_BK], swizzled.
__device__ __forceinline__ void matmul_load_stage(bf16* stage, const bf16* __restrict__ a,
                                                  const bf16* __restrict__ w, int m, int n, int k, int m0, int n0,
                                                  int k0) {
    constexpr int chunks_per_tile = MATMUL_BM * MATMUL_CHUNKS_PER_ROW;
    static_assert(MATMUL_BM == MATMUL_BN, "a and w tiles are loaded by the same index math");
    static_assert(chunks_per_tile % MATMUL_THREADS == 0, "every thread copies whole chunks");
#pragma unroll
    for (int i = 0; i < chunks_per_tile / MATMUL_THREADS; ++i) {
        const int index = threadIdx.x + i * MATMUL_THREADS;
        const int row = index / MATMUL_CHUNKS_PER_ROW;
        const int chunk = index % MATMUL_CHUNKS_PER_ROW;
        const int col = k0 + chunk * 8;
        const bool a_in = m0 + row < m && col < k;
        const bool w_in = n0 + row < n && col < k;
        cp_async_16_or_zero(tile_chunk<MATMUL_CHUNKS_PER_ROW>(stage, row, chunk),
                            a + (uint64_t)(a_in ? m0 + row : 0) * k + (a_in ? col : 0), a_in);
        cp_async_16_or_zero(tile_chunk<MATMUL_CHUNKS_PER_ROW>(stage + MATMUL_BM * MATMUL_BK, row, chunk),
                            w + (uint64_t)(w_in ? n0 + row : 0) * k + (w_in ? col : 0), w_in);
    }
}

template <typename Output>
__device__ __forceinline__ void matmul_mma(const bf16* __restrict__ a, const bf16* __restrict__ w, Output out,
                                           int m, int n, int k) {
    DYNAMIC_SHARED(bf16, stages);  // [MATMUL_STAGES][MATMUL_STAGE_ELEMS]
    const int m0 = blockIdx.y * MATMUL_BM;
    const int n0 = blockIdx.x * MATMUL_BN;
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp_m0 = (warp / 4) * MATMUL_WARP_M;
    const int warp_n0 = (warp % 4) * MATMUL_WARP_N;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                acc[i][j][c] = 0.0f;
            }
        }
    }

    const int k_tiles = (k + MATMUL_BK - 1) / MATMUL_BK;
#pragma unroll
    for (int s = 0; s < MATMUL_STAGES - 1; ++s) {
        if (s < k_tiles) {
            matmul_load_stage(stages + s * MATMUL_STAGE_ELEMS, a, w, m, n, k, m0, n0, s * MATMUL_BK);
        }
        cp_async_commit();
    }

    for (int kt = 0; kt < k_tiles; ++kt) {
        // Tile kt has landed; every warp is done with the stage the next prefetch overwrites.
        cp_async_wait_group<MATMUL_STAGES - 2>();
        __syncthreads();
        const int next = kt + MATMUL_STAGES - 1;
        if (next < k_tiles) {
            matmul_load_stage(stages + (next % MATMUL_STAGES) * MATMUL_STAGE_ELEMS, a, w, m, n, k, m0, n0,
                              next * MATMUL_BK);
        }
        cp_async_commit();

        bf16* a_tile = stages + (kt % MATMUL_STAGES) * MATMUL_STAGE_ELEMS;
        bf16* w_tile = a_tile + MATMUL_BM * MATMUL_BK;
#pragma unroll
        for (int kk = 0; kk < MATMUL_BK / 16; ++kk) {
            // A fragments: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (0-7, 8-15), (8-15, 8-15).
            uint32_t a_frag[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = warp_m0 + i * 16 + (lane & 15);
                ldmatrix_x4(a_frag[i], tile_chunk<MATMUL_CHUNKS_PER_ROW>(a_tile, row, kk * 2 + (lane >> 4)));
            }
            // B fragments of two n8 tiles per ldmatrix: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, ...).
            uint32_t b_frag[4][2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int row = warp_n0 + j * 16 + ((lane >> 4) << 3) + (lane & 7);
                uint32_t r[4];
                ldmatrix_x4(r, tile_chunk<MATMUL_CHUNKS_PER_ROW>(w_tile, row, kk * 2 + ((lane >> 3) & 1)));
                b_frag[2 * j][0] = r[0];
                b_frag[2 * j][1] = r[1];
                b_frag[2 * j + 1][0] = r[2];
                b_frag[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    mma_m16n8k16_bf16(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
                }
            }
        }
    }
    cp_async_wait_all();

    // Accumulator c[i] holds row g + 8 * (i >= 2), column 2t + (i & 1) of its 16 x 8 tile.
    const int g = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int row = m0 + warp_m0 + i * 16 + g + (c >= 2 ? 8 : 0);
                const int col = n0 + warp_n0 + j * 8 + 2 * t + (c & 1);
                if (row < m && col < n) {
                    out((uint64_t)row * n + col, acc[i][j][c]);
                }
            }
        }
    }
}

// out = a . wT. Grid (ceil(n / 128), ceil(m / 128)), block MATMUL_THREADS, dynamic shared
// MATMUL_STAGES * MATMUL_STAGE_ELEMS * 2 bytes (48 KiB).
extern "C" __global__ void matmul_mma_bf16(const bf16* a,  // [m, k]
                                           const bf16* w,  // [n, k]
                                           bf16* out,      // [m, n]
                                           int m, int n, int k) {
    matmul_mma(a, w, StoreBf16{out}, m, n, k);
}

// matmul_mma_bf16 with f32 output (logits of every prompt position).
extern "C" __global__ void matmul_mma_bf16_out_f32(const bf16* a,  // [m, k]
                                                   const bf16* w,  // [n, k]
                                                   float* out,     // [m, n]
                                                   int m, int n, int k) {
    matmul_mma(a, w, StoreF32{out}, m, n, k);
}

// residual += a . wT: a sublayer's output projection added to the residual stream.
extern "C" __global__ void matmul_mma_bf16_add_f32(const bf16* a,    // [m, k]
                                                   const bf16* w,    // [n, k]
                                                   float* residual,  // [m, n]
                                                   int m, int n, int k) {
    matmul_mma(a, w, AddF32{residual}, m, n, k);
}
