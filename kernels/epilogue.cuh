// What happens to an output element between its FP32 accumulators and memory, for every kernel:
// the activation of a gated GEMM, the rounding to bf16 and the store. A new activation is one
// struct here, like SwiGLU.
#pragma once
#include "problem.cuh"

namespace mxfp8_moe {

// x * sigmoid(x) with the approximate exponential and division (a few ulp in float, far below
// the bf16 output's rounding); an IEEE division here was a fifth of the gated wgmma kernel's time.
// Very negative x: the denominator overflows and the result is 0, as the limit is.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// The gated activations. Each comes in two parts, the gate's alone and the combination, so that a
// kernel whose gate accumulators live in other threads than the up ones (the wgmma kernel's gate
// warpgroup) computes the gate's part there and hands over one float: in the wgmma kernel,
// computing silu on the up warpgroup's side instead cost 5-14 % at 1024-4096 tokens (H100).
template <int ACTIVATION>
struct Activation;

// FlashInfer's: out = up * silu(gate).
template <>
struct Activation<kSwiGLU> {
    __device__ __forceinline__ static float gate_part(const GroupedGemmParams&, float gate) { return silu(gate); }
    __device__ __forceinline__ static float combine(const GroupedGemmParams&, float up, float gate_part) {
        return up * gate_part;
    }
};

// gpt-oss's: gate clamped to <= limit, up to [-limit, limit], out = (up + 1) * gate * sigmoid(alpha *
// gate). The comparisons keep a NaN a NaN (fminf would replace it by the limit).
template <>
struct Activation<kClampedSwiGLU> {
    __device__ __forceinline__ static float gate_part(const GroupedGemmParams& p, float gate) {
        const float g = gate > p.limit ? p.limit : gate;
        return __fdividef(g, 1.0f + __expf(-p.alpha * g));
    }
    __device__ __forceinline__ static float combine(const GroupedGemmParams& p, float up, float gate_part) {
        const float u = up > p.limit ? p.limit : (up < -p.limit ? -p.limit : up);
        return (u + 1.0f) * gate_part;
    }
};

// The epilogue of a GEMM with N rows of b per expert and a (cum_m, kNOut) bf16 row-major output.
// Gated, an output element has two accumulators (its up and gate rows); otherwise the gate
// operands are unused. The bias, where the variant has one, is added to an accumulator before the
// activation, per row of b.
template <int N, bool GATED, typename V = Variant<>>
struct Epilogue {
    static constexpr int kNOut = GATED ? N / 2 : N;
    using Act = Activation<V::kActivation>;

    // The rows of b (of its expert) whose products make output column col.
    __device__ __forceinline__ static int up_row(int col) { return GATED && V::kInterleaved ? 2 * col + 1 : col; }
    __device__ __forceinline__ static int gate_row(int col) { return V::kInterleaved ? 2 * col : kNOut + col; }

    // The up (gate) accumulator of output column col plus its row's bias, where the variant has one.
    // Columns past the output (a tile's tail: computed, never stored) read no bias.
    __device__ __forceinline__ static float up_with_bias(const GroupedGemmParams& p, int expert, int col, float up) {
        if constexpr (V::kBias) return col < kNOut ? up + p.bias[static_cast<i64>(expert) * N + up_row(col)] : up;
        return up;
    }
    __device__ __forceinline__ static float gate_with_bias(const GroupedGemmParams& p, int expert, int col, float gate) {
        if constexpr (V::kBias) return col < kNOut ? gate + p.bias[static_cast<i64>(expert) * N + gate_row(col)] : gate;
        return gate;
    }

    __device__ __forceinline__ static float gate_part(const GroupedGemmParams& p, float gate) {
        return Act::gate_part(p, gate);
    }

    // The output from the up accumulator and the gate's part.
    __device__ __forceinline__ static u16 combine(const GroupedGemmParams& p, float up, float gate_part) {
        return float_to_bf16(GATED ? Act::combine(p, up, gate_part) : up);
    }

    // The output from both accumulators.
    __device__ __forceinline__ static u16 value(const GroupedGemmParams& p, float up, float gate) {
        return combine(p, up, GATED ? gate_part(p, gate) : 0.0f);
    }

    // Element (row, col) of the output.
    __device__ __forceinline__ static void store(u16* out, int row, int col, u16 value) {
        out[static_cast<i64>(row) * kNOut + col] = value;
    }

    // Eight consecutive elements from col (a multiple of 8) of a row, in one 16-byte store.
    __device__ __forceinline__ static void store8(u16* out, int row, int col, const void* values) {
        *reinterpret_cast<u32x4*>(out + static_cast<i64>(row) * kNOut + col) = *reinterpret_cast<const u32x4*>(values);
    }
};

}  // namespace mxfp8_moe
