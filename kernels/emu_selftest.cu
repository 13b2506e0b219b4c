// Small kernels that exist to test the CUDA emulator (and, compiled by NVRTC, the real thing):
// a reduction, an elementwise op, a tiled mma matmul, probes of the documented fragment and
// shuffle layouts, and planted bugs that the emulator must report.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Working kernels.

// One block per row; blockDim.x is a multiple of 32 (at most 1024).
extern "C" __global__ void selftest_reduce_rows(const float* x,  // [rows, cols]
                                                float* out,      // [rows]
                                                int rows, int cols) {
    __shared__ float warp_sums[32];
    const int row = blockIdx.x;
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    float sum = 0.0f;
    if (row < rows) {
        for (int col = threadIdx.x; col < cols; col += blockDim.x) {
            sum += x[(size_t)row * cols + col];
        }
    }
    sum = warp_reduce_sum(sum);
    if (lane == 0) {
        warp_sums[warp] = sum;
    }
    __syncthreads();
    if (warp == 0) {
        sum = lane < warps ? warp_sums[lane] : 0.0f;
        sum = warp_reduce_sum(sum);
        if (lane == 0 && row < rows) {
            out[row] = sum;
        }
    }
}

// out = silu(gate) * up, elementwise, grid-stride.
extern "C" __global__ void selftest_silu_mul_bf16(const bf16* gate,  // [n]
                                                  const bf16* up,    // [n]
                                                  bf16* out,         // [n]
                                                  int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = bf16_to_f32(gate[i]);
        const float silu = g / (1.0f + expf(-g));
        out[i] = f32_to_bf16(silu * bf16_to_f32(up[i]));
    }
}

// Conversions as the kernels do them, for comparison with the reference rounding.
extern "C" __global__ void selftest_convert(const float* x,  // [n]
                                            bf16* to_bf16,   // [n]
                                            f16* to_f16,     // [n]
                                            float* from_f16, // [n], f16_to_f32(to_f16)
                                            int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        to_bf16[i] = f32_to_bf16(x[i]);
        to_f16[i] = f32_to_f16(x[i]);
        from_f16[i] = f16_to_f32(to_f16[i]);
    }
}

#define MMA_TILE_M 32
#define MMA_TILE_N 32
#define MMA_TILE_K 32
// Row stride of the shared tiles in bf16: 8 extra elements keep rows 16-byte aligned for
// ldmatrix and cp.async while shifting consecutive rows across banks.
#define MMA_SMEM_STRIDE (MMA_TILE_K + 8)

// Stages the [32 x 32] tile at (row0, k0) of a row-major [rows, k] bf16 matrix into shared
// memory: one 16-byte chunk per thread (128 threads), cp.async when the chunk is in bounds and
// aligned, zero-padded element copies otherwise.
__device__ __forceinline__ void stage_tile(bf16 (*tile)[MMA_SMEM_STRIDE], const bf16* matrix, int rows, int k,
                                           int row0, int k0) {
    const int row = threadIdx.x / 4;
    const int kc = (threadIdx.x % 4) * 8;
    const int global_row = row0 + row;
    const int global_k = k0 + kc;
    if (global_row < rows && global_k + 8 <= k && k % 8 == 0) {
        cp_async_16(&tile[row][kc], matrix + (size_t)global_row * k + global_k);
    } else {
        for (int e = 0; e < 8; ++e) {
            bf16 value;
            value.bits = 0;
            if (global_row < rows && global_k + e < k) {
                value = matrix[(size_t)global_row * k + global_k + e];
            }
            tile[row][kc + e] = value;
        }
    }
}

// c = a * b^T with bf16 inputs and f32 accumulation through mma.m16n8k16, double-buffered
// cp.async staging. Grid (ceil(n / 32), ceil(m / 32)), block 128 threads = 2 x 2 warps, each
// warp owning a 16 x 16 piece of the 32 x 32 block tile.
extern "C" __global__ void selftest_matmul_bf16_mma(const bf16* a,  // [m, k] row-major
                                                    const bf16* b,  // [n, k] row-major (b^T)
                                                    float* c,       // [m, n] row-major
                                                    int m, int n, int k) {
    __shared__ __align__(16) bf16 a_tiles[2][MMA_TILE_M][MMA_SMEM_STRIDE];
    __shared__ __align__(16) bf16 b_tiles[2][MMA_TILE_N][MMA_SMEM_STRIDE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warp_m = warp / 2;
    const int warp_n = warp % 2;
    const int row0 = blockIdx.y * MMA_TILE_M;
    const int col0 = blockIdx.x * MMA_TILE_N;
    const int k_tiles = (k + MMA_TILE_K - 1) / MMA_TILE_K;
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};

    stage_tile(a_tiles[0], a, m, k, row0, 0);
    stage_tile(b_tiles[0], b, n, k, col0, 0);
    cp_async_commit();
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int stage = kt & 1;
        if (kt + 1 < k_tiles) {
            stage_tile(a_tiles[stage ^ 1], a, m, k, row0, (kt + 1) * MMA_TILE_K);
            stage_tile(b_tiles[stage ^ 1], b, n, k, col0, (kt + 1) * MMA_TILE_K);
        }
        cp_async_commit();
        cp_async_wait_group<1>();
        __syncthreads();
        for (int kk = 0; kk < MMA_TILE_K; kk += 16) {
            // A: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) in a[0..3] order.
            uint32_t a_frag[4];
            ldmatrix_x4(a_frag, &a_tiles[stage][warp_m * 16 + lane % 16][kk + (lane / 16) * 8]);
            // B^T rows are n: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
            uint32_t b_frag[4];
            ldmatrix_x4(b_frag, &b_tiles[stage][warp_n * 16 + (lane / 16) * 8 + lane % 8][kk + ((lane / 8) & 1) * 8]);
            mma_m16n8k16_bf16(acc[0], a_frag, &b_frag[0], acc[0]);
            mma_m16n8k16_bf16(acc[1], a_frag, &b_frag[2], acc[1]);
        }
        __syncthreads();
    }
    const int g = lane >> 2;
    const int t = lane & 3;
    for (int j = 0; j < 2; ++j) {
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + warp_m * 16 + g + (i >= 2 ? 8 : 0);
            const int col = col0 + warp_n * 16 + j * 8 + 2 * t + (i & 1);
            if (row < m && col < n) {
                c[(size_t)row * n + col] = acc[j][i];
            }
        }
    }
}

// Loads x into dynamic shared memory and writes it back reversed; one block, n <= shared / 4.
extern "C" __global__ void selftest_dynamic_shared_reverse(const float* x,  // [n]
                                                           float* out,      // [n]
                                                           int n) {
    DYNAMIC_SHARED(float, staged);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        staged[i] = x[i];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        out[i] = staged[n - 1 - i];
    }
}

// 40 KiB of static shared memory: legal alone, over the 48 KiB default with > 8 KiB dynamic.
extern "C" __global__ void selftest_static_shared_40k(float* out) {  // [blockDim.x]
    __shared__ float staged[10240];
    for (int i = threadIdx.x; i < 10240; i += blockDim.x) {
        staged[i] = (float)i;
    }
    __syncthreads();
    out[threadIdx.x] = staged[10239 - threadIdx.x];
}

// ---------------------------------------------------------------------------------------------
// Probes of the documented layouts (one warp).

// Which lane each shuffle reads: rows idx, up, down, xor with operand b, then idx with a
// per-lane source lane * 7 + b.
extern "C" __global__ void selftest_shuffle_sources(int* out,  // [5, 32]
                                                    int b, int width) {
    const int lane = threadIdx.x;
    out[0 * 32 + lane] = __shfl_sync(FULL_WARP_MASK, lane, b, width);
    out[1 * 32 + lane] = __shfl_up_sync(FULL_WARP_MASK, lane, (unsigned)b, width);
    out[2 * 32 + lane] = __shfl_down_sync(FULL_WARP_MASK, lane, (unsigned)b, width);
    out[3 * 32 + lane] = __shfl_xor_sync(FULL_WARP_MASK, lane, b, width);
    out[4 * 32 + lane] = __shfl_sync(FULL_WARP_MASK, lane, lane * 7 + b, width);
}

// Votes and reductions over the lanes of each warp.
extern "C" __global__ void selftest_votes(const int* predicate,  // [blockDim.x]
                                          unsigned* out) {       // [blockDim.x, 5]
    const int t = threadIdx.x;
    const int p = predicate[t];
    out[t * 5 + 0] = __ballot_sync(FULL_WARP_MASK, p);
    out[t * 5 + 1] = (unsigned)__all_sync(FULL_WARP_MASK, p);
    out[t * 5 + 2] = (unsigned)__any_sync(FULL_WARP_MASK, p);
    out[t * 5 + 3] = __reduce_add_sync(FULL_WARP_MASK, (unsigned)p);
    out[t * 5 + 4] = (unsigned)warp_reduce_max((float)p);
}

// One mma.m16n8k16 on fragments given per lane.
extern "C" __global__ void selftest_mma_fragments(const uint32_t* a_regs,  // [32, 4]
                                                  const uint32_t* b_regs,  // [32, 2]
                                                  const float* c_regs,     // [32, 4]
                                                  float* d_regs) {         // [32, 4]
    const int lane = threadIdx.x;
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
    float d[4];
    for (int i = 0; i < 4; ++i) {
        a[i] = a_regs[lane * 4 + i];
        c[i] = c_regs[lane * 4 + i];
    }
    b[0] = b_regs[lane * 2 + 0];
    b[1] = b_regs[lane * 2 + 1];
    mma_m16n8k16_bf16(d, a, b, c);
    for (int i = 0; i < 4; ++i) {
        d_regs[lane * 4 + i] = d[i];
    }
}

// ldmatrix x4, x4.trans, x2, x2.trans of a 16 x 16 tile; lane l points at row l % 16,
// column (l / 16) * 8, so the matrices are (rows 0-7 | 8-15) x (cols 0-7 | 8-15).
extern "C" __global__ void selftest_ldmatrix(const bf16* tile,  // [16, 16] row-major
                                             uint32_t* out) {   // [32, 12]
    __shared__ __align__(16) bf16 staged[16][16];
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) {
        staged[i / 16][i % 16] = tile[i];
    }
    __syncwarp();
    const void* row = &staged[lane % 16][(lane / 16) * 8];
    uint32_t r[4];
    ldmatrix_x4(r, row);
    for (int i = 0; i < 4; ++i) {
        out[lane * 12 + i] = r[i];
    }
    ldmatrix_x4_trans(r, row);
    for (int i = 0; i < 4; ++i) {
        out[lane * 12 + 4 + i] = r[i];
    }
    ldmatrix_x2(r, row);
    out[lane * 12 + 8] = r[0];
    out[lane * 12 + 9] = r[1];
    ldmatrix_x2_trans(r, row);
    out[lane * 12 + 10] = r[0];
    out[lane * 12 + 11] = r[1];
}

// Three cp.async groups per thread into dynamic shared memory (3 * blockDim.x * 16 bytes):
// `early` is read after cp_async_wait_group<2> (only group 0 is guaranteed), `late` after
// cp_async_wait_all. The emulator completes groups only when waited for.
extern "C" __global__ void selftest_cp_async_groups(const float* src,  // [3, blockDim.x, 4]
                                                    float* early,      // [3, blockDim.x, 4]
                                                    float* late) {     // [3, blockDim.x, 4]
    DYNAMIC_SHARED(float, staged);
    const int t = threadIdx.x;
    const int group_stride = blockDim.x * 4;
    for (int group = 0; group < 3; ++group) {
        cp_async_16(&staged[group * group_stride + t * 4], &src[group * group_stride + t * 4]);
        cp_async_commit();
    }
    cp_async_wait_group<2>();
    for (int group = 0; group < 3; ++group) {
        for (int i = 0; i < 4; ++i) {
            early[group * group_stride + t * 4 + i] = staged[group * group_stride + t * 4 + i];
        }
    }
    cp_async_wait_all();
    for (int group = 0; group < 3; ++group) {
        for (int i = 0; i < 4; ++i) {
            late[group * group_stride + t * 4 + i] = staged[group * group_stride + t * 4 + i];
        }
    }
}

// Sum of x per warp, written by lane 0 of each warp; needs blockDim.x a multiple of 32.
extern "C" __global__ void selftest_warp_sums(const float* x,  // [blockDim.x]
                                              float* out) {    // [blockDim.x / 32]
    const float sum = warp_reduce_sum(x[threadIdx.x]);
    if (threadIdx.x % WARP_SIZE == 0) {
        out[threadIdx.x / WARP_SIZE] = sum;
    }
}

// `iterations` barriers and warp syncs per thread: the emulator's switch cost.
extern "C" __global__ void selftest_sync_loop(float* out,  // [gridDim.x * blockDim.x]
                                              int iterations) {
    float value = (float)threadIdx.x;
    for (int i = 0; i < iterations; ++i) {
        __syncthreads();
        value += __shfl_xor_sync(FULL_WARP_MASK, value, 1) * 0.5f;
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

// ---------------------------------------------------------------------------------------------
// Planted bugs: each one must make the emulator fail the launch.

// Writes out[n]: one element past the end.
extern "C" __global__ void planted_oob_write(float* out,  // [n]
                                             int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) {
        out[i] = 1.0f;
    }
}

// Reads x[n]: one element past the end (caught by the AddressSanitizer build).
extern "C" __global__ void planted_oob_read(const float* x,  // [n]
                                            float* out,      // [n]
                                            int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = x[i + 1];
    }
}

// Threads past n return before grid_dependency_wait(): in a programmatic launch such a grid
// could finish before the kernel it depends on and let the next kernel start too early.
extern "C" __global__ void planted_return_before_wait(float* out,  // [n]
                                                      int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    grid_dependency_wait();
    out[i] = 1.0f;
}

// Only the lower half of the block reaches the barrier.
extern "C" __global__ void planted_divergent_barrier(float* out) {  // [blockDim.x]
    __shared__ float staged[1024];
    const int t = threadIdx.x;
    staged[t] = (float)t;
    if (t < (int)blockDim.x / 2) {
        __syncthreads();
    }
    out[t] = staged[blockDim.x - 1 - t];
}

// Both branches have a barrier, but they are different barriers.
extern "C" __global__ void planted_if_else_barrier(float* out) {  // [blockDim.x]
    __shared__ float staged[1024];
    const int t = threadIdx.x;
    staged[t] = (float)t;
    if (t % 2 == 0) {
        __syncthreads();
        out[t] = staged[blockDim.x - 1 - t];
    } else {
        __syncthreads();
        out[t] = -staged[blockDim.x - 1 - t];
    }
}

// Reads another thread's shared memory slot without the barrier between write and read.
extern "C" __global__ void planted_shared_race(const float* x,  // [blockDim.x]
                                               float* out) {    // [blockDim.x]
    __shared__ float staged[1024];
    const int t = threadIdx.x;
    staged[t] = 2.0f * x[t];
    out[t] = staged[blockDim.x - 1 - t];
}

// Half of the warp skips a shuffle whose mask promises all 32 lanes.
extern "C" __global__ void planted_shuffle_missing_lane(float* out) {  // [blockDim.x]
    float value = (float)threadIdx.x;
    if (threadIdx.x % WARP_SIZE < 16) {
        value = __shfl_xor_sync(FULL_WARP_MASK, value, 1);
    }
    out[threadIdx.x] = value;
}
