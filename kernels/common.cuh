// common.cuh -- the one switch between the two compilers of every kernels/*.cu, plus the small
// reduction helpers all families use.
//
// GPU (NVRTC/nvcc, __CUDACC__ / __CUDACC_RTC__): kernels are `extern "C" __global__` so the
// runtime finds them by their plain name (cuModuleGetFunction). build.rs inlines this file into
// each .cu before compiling and embedding it, so run-time NVRTC needs only the CUDA include path.
// CPU (g++ -std=c++20, see emu/cuda_emu.h): build.rs has already included the shim at global
// scope and includes the .cu inside a per-family namespace; kernels get internal linkage and are
// reached through the generated extern "C" launchers. Nothing here may include a system header
// on the CPU side (it would land inside that namespace).
//
// Conventions for kernel code (both compilers must accept it):
//  * `extern __shared__` arrays are written DYN_SHARED(T, name);
//  * min/max only on equal types (the CPU side uses std::min/std::max); fminf/fmaxf for floats;
//  * warp shuffles with the full mask, on full warps (blockDim.x a multiple of 32);
//  * exp/log in fp32 (expf/logf; __expf only where 2 ulp is documented to be enough).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
#define DYN_SHARED(T, name) extern __shared__ T name[]
#define KERNEL extern "C" __global__
#else
#ifndef CUDA_EMU_H
#error "kernels/*.cu are compiled for the CPU only through build.rs's wrappers (emu/cuda_emu.h first)"
#endif
#define KERNEL static
#endif

#define FULL_MASK 0xffffffffu

// Grid-stride loop over [0, n) with 32-bit indices: callers keep n < 2^31 (the launch wrappers
// check it), which makes the per-element channel index `i % C` a 32-bit division, several
// times cheaper on the GPU than the 64-bit one.
#define GRID_STRIDE_LOOP(i, n) \
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(n); i += gridDim.x * blockDim.x)

typedef __nv_bfloat16 bf16;

// Sum / max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Block-wide sum / max over blockDim.x threads (a multiple of 32, at most 1024): warp
// reduction, one partial per warp in `scratch` (>= 33 floats of shared memory), warp 0 reduces
// the partials. Every thread gets the result; `scratch` may be reused after return.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float r = lane < nwarps ? scratch[lane] : 0.f;
        r = warp_sum(r);
        if (lane == 0) scratch[32] = r;
    }
    __syncthreads();
    const float r = scratch[32];
    __syncthreads();
    return r;
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float r = lane < nwarps ? scratch[lane] : -INFINITY;
        r = warp_max(r);
        if (lane == 0) scratch[32] = r;
    }
    __syncthreads();
    const float r = scratch[32];
    __syncthreads();
    return r;
}
