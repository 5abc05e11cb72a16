// The CUDA library's copy of csrc/cpu/conv_gemm_cpu.cpp: the conv code is device-generic code on the
// LibTorch stable ABI that the CUDA kernels of the conv ops reuse (csrc/cuda/conv_operator_cuda.cpp
// registers it); its CPU registrations stay in specreg_fast._C.
#define SPECREG_NO_CPU_IMPL
#include "../cpu/conv_gemm_cpu.cpp"
