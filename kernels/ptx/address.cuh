// Shared-memory addresses as the async copy, barrier and wgmma instructions take them: 32-bit
// offsets in the shared window rather than generic pointers.
#pragma once
#include "../common.cuh"

namespace mxfp8_moe::ptx {

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 address;
    asm("{ .reg .u64 generic; cvta.to.shared.u64 generic, %1; cvt.u32.u64 %0, generic; }"
        : "=r"(address) : "l"(p));
    return address;
}

}  // namespace mxfp8_moe::ptx
