#pragma once
// Lets one definition of the shared math compile for host (C++) and device (CUDA).
#if defined(__CUDACC__)
#define ALCHEMY_HD __host__ __device__ __forceinline__
#else
#define ALCHEMY_HD inline
#endif
