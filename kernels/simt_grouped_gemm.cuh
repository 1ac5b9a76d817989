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

template <int THREADS, int K_GRAN, bool GATED, int N, int K, typename V = Variant<>>
struct SimtGemm {
    static constexpr int kThreads = THREADS;
    static constexpr bool kMxfp4 = V::kWeights == kE2M1;
    static constexpr int kWeightRowBytes = kMxfp4 ? K / 2 : K;
    using Output = Epilogue<N, GATED, V>;

    // Weight element kk of a row: a byte of e4m3, or the kk % 2 nibble of byte kk / 2 (e2m1).
    __device__ __forceinline__ static float weight(const u8* row, int kk, const float* e4m3_table,
                                                   const float* e2m1_table) {
        if constexpr (kMxfp4) return e2m1_table[(row[kk / 2] >> (4 * (kk % 2))) & 0xF];
        return e4m3_table[row[kk]];
    }

    __device__ __forceinline__ static void run(const GroupedGemmParams& p) {
        constexpr int n = N, k = K;
        __shared__ float e4m3_table[256];
        __shared__ float e2m1_table[kMxfp4 ? 16 : 1];
        for (int i = threadIdx.x; i < 256; i += THREADS) e4m3_table[i] = e4m3_to_float(i);
        if (kMxfp4 && threadIdx.x < 16) e2m1_table[threadIdx.x] = e2m1_to_float(threadIdx.x);
        __syncthreads();

        const int e = blockIdx.y;
        const int begin = monotone_offset(p, e);
        const ExpertRows rows = expert_rows(e, begin, max(begin, clamped_offset(p, e + 1)));
        constexpr int n_out = Output::kNOut;
        const int col = blockIdx.x * THREADS + threadIdx.x;
        if (col >= n_out) return;

        constexpr int num_blocks = ceil_div(k, K_GRAN);
        const int up_row = Output::up_row(col), gate_row = Output::gate_row(col);
        const u8* b_up = p.b + (static_cast<i64>(e) * n + up_row) * kWeightRowBytes;
        const u8* b_gate = p.b + (static_cast<i64>(e) * n + gate_row) * kWeightRowBytes;
        const i32* sb_up = p.b_scale + e * p.b_scale_stride_expert + up_row * p.b_scale_stride_row;
        const i32* sb_gate = p.b_scale + e * p.b_scale_stride_expert + gate_row * p.b_scale_stride_row;

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
                    dot_up = fmaf(x, weight(b_up, kk, e4m3_table, e2m1_table), dot_up);
                    if (GATED) dot_gate = fmaf(x, weight(b_gate, kk, e4m3_table, e2m1_table), dot_gate);
                }
                up += sa * ue8m0_to_float(byte_of(sb_up[word * p.b_scale_stride_word], byte)) * dot_up;
                if (GATED) gate += sa * ue8m0_to_float(byte_of(sb_gate[word * p.b_scale_stride_word], byte)) * dot_gate;
            }
            Output::store(p.out, row, col, Output::value(p, Output::up_with_bias(p, e, col, up),
                                                         Output::gate_with_bias(p, e, col, gate)));
        }
    }
};

}  // namespace mxfp8_moe
