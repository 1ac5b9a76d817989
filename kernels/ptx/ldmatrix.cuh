// ldmatrix (and plain loads): shared memory -> MMA fragments. With 8-bit data viewed as b16 pairs, one 8x8 b16 matrix
// is 8 rows x 16 bytes, and lane l receives bytes 4*(l%4) .. 4*(l%4)+3 of row l/4: exactly the
// register layout m16n8k32 expects for K-contiguous A and B tiles.
#pragma once
#include "../common.cuh"

namespace mxfp8_moe::ptx {

// Lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// This thread's lane, read from the register each time (volatile: not hoisted out of loops).
__device__ __forceinline__ int lane_id() {
    int lane;
    asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(lane));
    return lane;
}

// Two bytes of shared memory, zero-extended (an MXFP4 fragment register's four packed codes).
__device__ __forceinline__ u32 load_shared_u16(u32 address) {
    unsigned short value;
    asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(value) : "r"(address));
    return value;
}

// Lanes 0..15 give the row addresses (8 per matrix); the other lanes' addresses are ignored.
__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], u32 address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(address));
}

}  // namespace mxfp8_moe::ptx
