// Asynchronous global -> shared copies (cp.async, sm_80+). A source size of 0 zero-fills the
// destination without reading the source, which is how tile rows and K chunks past the end of a
// tensor are handled.
#pragma once
#include "address.cuh"

namespace mxfp8_moe::ptx {

// 16 bytes, bypassing L1 (streamed operands).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

// 4 bytes (one int32 word of UE8M0 scales).
__device__ __forceinline__ void cp_async_4(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"(dst), "l"(src), "r"(valid ? 4 : 0) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most `PENDING` committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory"); }

}  // namespace mxfp8_moe::ptx
