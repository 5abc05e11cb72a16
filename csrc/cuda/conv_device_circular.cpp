// The CUDA library's copy of csrc/cpu/circular_conv_cpu.cpp: the conv code is device-generic ATen code that the CUDA
// kernels of the conv ops reuse (csrc/cuda/conv_operator_cuda.cpp); its CPU registrations stay in
// specreg_fast._C_conv (csrc/conv_module.cpp).
#define SPECREG_NO_CPU_IMPL
#include "../cpu/circular_conv_cpu.cpp"
