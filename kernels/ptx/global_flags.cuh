// Counters in global memory through which the CTAs of one grid hand work to each other (gpu
// scope): a writer publishes with release semantics after its data, a reader acquires before
// reading that data.
#pragma once
#include "../common.cuh"

namespace mxfp8_moe::ptx {

// counter += value, after (release) everything this thread has written or observed (what other
// threads wrote before a barrier it passed included).
__device__ __forceinline__ void add_release(i32* counter, int value) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" :: "l"(counter), "r"(value) : "memory");
}

// The counter, before (acquire) every later access of this thread.
__device__ __forceinline__ int load_acquire(const i32* counter) {
    int value;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(value) : "l"(counter) : "memory");
    return value;
}

// Returns the counter's old value; acquire and release.
__device__ __forceinline__ int fetch_add_acq_rel(i32* counter, int value) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(counter), "r"(value) : "memory");
    return old;
}

__device__ __forceinline__ void sleep_ns(u32 ns) {
#if __CUDA_ARCH__ >= 700
    asm volatile("nanosleep.u32 %0;\n" :: "r"(ns));
#endif
}

}  // namespace mxfp8_moe::ptx
