// Tensor-memory-accelerator copies and the mbarriers they complete on (sm_90+).
//
// A tile copy names a tensor map (built on the host by cuTensorMapEncodeTiled and passed as a
// __grid_constant__ kernel parameter), the tile's coordinates and an mbarrier; the copy engine
// zero-fills whatever part of the box lies outside the tensor and counts the box's full byte size
// against the barrier's expected transaction count.
#pragma once
#include "address.cuh"

namespace mxfp8_moe::ptx {

// CUtensorMap: 128 opaque bytes, 64-byte aligned (cuda.h is not on NVRTC's include path).
struct alignas(64) TensorMap {
    u64 opaque[16];
};

__device__ __forceinline__ void mbarrier_init(u32 barrier, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(barrier), "r"(arrivals) : "memory");
}

// Makes initialized barriers visible to the copy engine (the async proxy) before any copy uses them.
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(u32 barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(barrier) : "memory");
}

// One arrival, and `bytes` more that copies must deliver before the phase can complete.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u32 barrier, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(barrier), "r"(bytes) : "memory");
}

// Block until the phase with this parity has completed. CLUSTER: acquire at cluster scope what
// threads of other CTAs released by arriving remotely (ptx/cluster.cuh).
template <bool CLUSTER = false>
__device__ __forceinline__ void mbarrier_wait(u32 barrier, u32 parity) {
    u32 done;
    do {
        if constexpr (CLUSTER)
            asm volatile("{\n .reg .pred complete;\n"
                         " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 complete, [%1], %2;\n"
                         " selp.u32 %0, 1, 0, complete;\n}\n"
                         : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
        else
            asm volatile("{\n .reg .pred complete;\n"
                         " mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
                         " selp.u32 %0, 1, 0, complete;\n}\n"
                         : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
    } while (!done);
}

// A 2-D tile: x is the innermost (contiguous) coordinate in elements, y the row.
__device__ __forceinline__ void tma_load_2d(u32 destination, const TensorMap* map, int x, int y, u32 barrier) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n"
                 :: "r"(destination), "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(barrier) : "memory");
}

// A 3-D tile: x innermost, then y, then z.
__device__ __forceinline__ void tma_load_3d(u32 destination, const TensorMap* map, int x, int y, int z, u32 barrier) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];\n"
                 :: "r"(destination), "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(z), "r"(barrier)
                 : "memory");
}

// A 2-D tile from shared to global memory, tracked by this thread's bulk async-groups; the copy
// engine skips the part of the box outside the tensor.
__device__ __forceinline__ void tma_store_2d(const TensorMap* map, u32 source, int x, int y) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
                 :: "l"(reinterpret_cast<u64>(map)), "r"(source), "r"(x), "r"(y) : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Wait until this thread's committed bulk copies have read their shared-memory sources.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }

// Wait until this thread's committed bulk copies are complete.
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Makes this thread's ordinary shared-memory writes visible to the copy engine (the async proxy).
__device__ __forceinline__ void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Orders this thread's generic-proxy view of global memory (stores it made or acquired) before its
// later copy-engine accesses of global memory.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

__device__ __forceinline__ void prefetch_tensor_map(const TensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(reinterpret_cast<u64>(map)) : "memory");
}

}  // namespace mxfp8_moe::ptx
