// What happens to an output element between its FP32 accumulators and memory, for every kernel:
// the activation of a gated GEMM, the rounding to bf16 and the store. A new activation is one
// struct here, like SwiGLU.
#pragma once
#include "common.cuh"

namespace mxfp8_moe {

// x * sigmoid(x) with the approximate exponential and division (a few ulp in float, far below
// the bf16 output's rounding); an IEEE division here was a fifth of the gated wgmma kernel's time.
// Very negative x: the denominator overflows and the result is 0, as the limit is.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// FlashInfer's gated activation: each expert's weight rows are [up; gate], out = up * silu(gate).
// An activation comes in two parts, the gate's alone and the combination, so that a kernel whose
// gate accumulators live in other threads than the up ones (the wgmma kernel's gate warpgroup)
// computes the gate's part there and hands over one float: in the wgmma kernel, computing silu on
// the up warpgroup's side instead cost 5-14 % at 1024-4096 tokens (H100).
struct SwiGLU {
    __device__ __forceinline__ static float gate_part(float gate) { return silu(gate); }
    __device__ __forceinline__ static float combine(float up, float gate_part) { return up * gate_part; }
};

// The epilogue of a GEMM whose output is (cum_m, N_OUT) bf16, row-major. Gated, an output element
// has two accumulators (its up and gate rows); otherwise the gate operands are unused.
template <int N_OUT, bool GATED, typename Activation = SwiGLU>
struct Epilogue {
    __device__ __forceinline__ static float gate_part(float gate) { return Activation::gate_part(gate); }

    // The output from the up accumulator and the gate's part.
    __device__ __forceinline__ static u16 combine(float up, float gate_part) {
        return float_to_bf16(GATED ? Activation::combine(up, gate_part) : up);
    }

    // The output from both accumulators.
    __device__ __forceinline__ static u16 value(float up, float gate) {
        return combine(up, GATED ? gate_part(gate) : 0.0f);
    }

    // Element (row, col) of the output.
    __device__ __forceinline__ static void store(u16* out, int row, int col, u16 value) {
        out[static_cast<i64>(row) * N_OUT + col] = value;
    }

    // Eight consecutive elements from col (a multiple of 8) of a row, in one 16-byte store.
    __device__ __forceinline__ static void store8(u16* out, int row, int col, const void* values) {
        *reinterpret_cast<u32x4*>(out + static_cast<i64>(row) * N_OUT + col) = *reinterpret_cast<const u32x4*>(values);
    }
};

}  // namespace mxfp8_moe
