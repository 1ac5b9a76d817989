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

// Traps where the launch gave less dynamic shared memory than `bytes`: a kernel lays its shared
// memory out itself, and the host sizes the launch from its own copy of that layout.
__device__ __forceinline__ void require_dynamic_shared(int bytes) {
    u32 given;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < static_cast<u32>(bytes)) __trap();
}

}  // namespace mxfp8_moe::ptx
