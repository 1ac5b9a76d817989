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

// The dynamic shared memory the launch gave: a kernel lays its shared memory out itself and traps
// where the host, which sizes it from its own copy of that layout, gave less.
__device__ __forceinline__ u32 dynamic_shared_bytes() {
    u32 bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

}  // namespace mxfp8_moe::ptx
