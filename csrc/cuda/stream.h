// The stream a kernel launcher runs on. cudaStream_t is `struct CUstream_st*`,
// so naming that type here gives every launcher the same signature in the
// CUDA build and in the emulation build (which ignores it) without pulling
// the CUDA headers into plain C++ callers.
#pragma once

struct CUstream_st;

namespace lk::cuda {

using Stream = CUstream_st*;

}  // namespace lk::cuda
