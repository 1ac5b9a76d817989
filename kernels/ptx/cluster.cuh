// Thread-block clusters (sm_90+): the CTAs of a cluster run at the same time and can read, write
// and arrive on mbarriers in each other's shared memory (distributed shared memory).
#pragma once
#include "../common.cuh"

namespace mxfp8_moe::ptx {

__device__ __forceinline__ int cluster_rank() {
    u32 rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return static_cast<int>(rank);
}

// Every thread of every CTA in the cluster arrives (release) and waits (acquire): what one CTA
// wrote before is visible to all after. Not .aligned: the threads may come from divergent paths.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\n"
                 "barrier.cluster.wait.acquire;\n" ::: "memory");
}

// Every thread of the CTA arrives and waits, as __syncthreads does, but not .aligned: the threads
// may come from divergent paths (a warp whose lanes took different roles).
__device__ __forceinline__ void cta_sync_divergent() { asm volatile("barrier.sync 0;\n" ::: "memory"); }

// cta_sync_divergent that also returns whether `predicate` holds in any thread of the CTA (the
// non-.aligned __syncthreads_or).
__device__ __forceinline__ bool cta_or_divergent(bool predicate) {
    u32 any;
    asm volatile("{\n\t.reg .pred p, q;\n\tsetp.ne.u32 p, %1, 0;\n\tbarrier.red.or.pred q, 0, p;\n\tselp.u32 %0, 1, 0, q;\n\t}\n"
                 : "=r"(any) : "r"(static_cast<u32>(predicate)) : "memory");
    return any != 0;
}

// The address of the same shared-memory location in the CTA of rank `rank` (shared::cluster window).
__device__ __forceinline__ u32 map_shared(u32 address, int rank) {
    u32 mapped;
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(mapped) : "r"(address), "r"(rank));
    return mapped;
}

__device__ __forceinline__ void store_cluster(u32 address, float x, float y, float z, float w) {
    asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(address), "f"(x), "f"(y), "f"(z), "f"(w) : "memory");
}

// One arrival on an mbarrier of another CTA (a map_shared address), releasing at cluster scope
// what this thread wrote before, to that CTA's shared memory included.
__device__ __forceinline__ void mbarrier_arrive_remote(u32 mapped_barrier) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" :: "r"(mapped_barrier) : "memory");
}

// (The matching wait is ptx::mbarrier_wait<true>, in ptx/tma.cuh beside the other mbarrier operations.)

}  // namespace mxfp8_moe::ptx
