// What happens to an output element between its FP32 accumulators and memory, for every kernel:
// the activation of a gated GEMM, the rounding to bf16 and the store. A new activation is one
// function here.
#pragma once
#include "common.cuh"

namespace mxfp8_moe {

// x * sigmoid(x) with the approximate exponential and division (a few ulp in float, far below
// the bf16 output's rounding); an IEEE division here was a fifth of the gated wgmma kernel's time.
// Very negative x: the denominator overflows and the result is 0, as the limit is.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// FlashInfer's gated activation: each expert's weight rows are [up; gate], out = up * silu(gate).
__device__ __forceinline__ float swiglu(float up, float gate) { return up * silu(gate); }

// The epilogue of a GEMM whose output is (cum_m, N_OUT) bf16, row-major. Gated, an output element
// has two accumulators (its up and gate rows); otherwise `gate` is unused.
template <int N_OUT, bool GATED>
struct Epilogue {
    __device__ __forceinline__ static u16 value(float up, float gate) {
        return float_to_bf16(GATED ? swiglu(up, gate) : up);
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
