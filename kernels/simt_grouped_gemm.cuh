// The portable grouped GEMM: one thread per output column, CUDA cores only.
//
// It implements the whole contract on any architecture NVRTC targets (sm_75 and later), with byte
// loads so no alignment is assumed. It is the fallback for GPUs without FP8 tensor cores and for
// tensors the tensor-core kernels do not take; it is not meant to be fast.
//
// Grid: x = blocks of columns, y = experts, z = slices of an expert's rows.
#pragma once
#include "epilogue.cuh"
#include "problem.cuh"

namespace mxfp8_moe {

template <int THREADS, int K_GRAN, bool GATED, int N, int K>
struct SimtGemm {
    static constexpr int kThreads = THREADS;

    __device__ __forceinline__ static void run(const GroupedGemmParams& p) {
        constexpr int n = N, k = K;
        __shared__ float e4m3_table[256];
        for (int i = threadIdx.x; i < 256; i += THREADS) e4m3_table[i] = e4m3_to_float(i);
        __syncthreads();

        const int e = blockIdx.y;
        const int begin = monotone_offset(p, e);
        const ExpertRows rows = expert_rows(e, begin, max(begin, clamped_offset(p, e + 1)));
        constexpr int n_out = GATED ? n / 2 : n;
        const int col = blockIdx.x * THREADS + threadIdx.x;
        if (col >= n_out) return;

        constexpr int num_blocks = ceil_div(k, K_GRAN);
        const u8* b_up = p.b + (static_cast<i64>(e) * n + col) * k;
        const u8* b_gate = b_up + static_cast<i64>(n_out) * k;
        const i32* sb_up = p.b_scale + e * p.b_scale_stride_expert + col * p.b_scale_stride_row;
        const i32* sb_gate = sb_up + n_out * p.b_scale_stride_row;

        for (int row = rows.begin + blockIdx.z; row < rows.end; row += gridDim.z) {
            const u8* a_row = p.a + static_cast<i64>(row) * k;
            const i32* sa_row = p.a_scale + (rows.scale_row + row - rows.begin) * p.a_scale_stride_row;
            float up = 0.0f, gate = 0.0f;
            for (int kb = 0; kb < num_blocks; ++kb) {
                const int word = kb / 4, byte = kb % 4;
                const float sa = ue8m0_to_float(byte_of(sa_row[word * p.a_scale_stride_word], byte));
                const int k_end = min(k, (kb + 1) * K_GRAN);
                float dot_up = 0.0f, dot_gate = 0.0f;
                for (int kk = kb * K_GRAN; kk < k_end; ++kk) {
                    const float x = e4m3_table[a_row[kk]];
                    dot_up = fmaf(x, e4m3_table[b_up[kk]], dot_up);
                    if (GATED) dot_gate = fmaf(x, e4m3_table[b_gate[kk]], dot_gate);
                }
                up += sa * ue8m0_to_float(byte_of(sb_up[word * p.b_scale_stride_word], byte)) * dot_up;
                if (GATED) gate += sa * ue8m0_to_float(byte_of(sb_gate[word * p.b_scale_stride_word], byte)) * dot_gate;
            }
            Epilogue<n_out, GATED>::store(p.out, row, col, Epilogue<n_out, GATED>::value(up, gate));
        }
    }
};

}  // namespace mxfp8_moe
