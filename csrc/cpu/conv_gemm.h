// Direct (im2col + register-blocked GEMM) kernels for one conv power step on a single image:
// t = A x and a = A^T t for a (non-transposed) convolution with any padding mode, computed
// with the weight read in its own (C_out, C_in/groups * prod(k)) row-major layout.
//
// Why: for one image the oneDNN convolutions spend most of their time reordering the weight
// into their blocked layout, on every call (the weight changes between training steps, so
// nothing can be cached). For ResNet-18's 512x512 3x3 conv at 4x4 that is ~0.8 ms of a
// 1.2 ms forward and ~1.5 ms of a 1.7 ms transposed conv on one thread, against ~0.3 ms
// for the arithmetic. These kernels stream the weight as it is: the forward is
// t = W C with C = im2col(x) (K x L, L output pixels), the adjoint G = W^T t followed by
// col2im(G). Both are "broadcast a weight entry, FMA a row of C (or t)" loops with the
// output tile in registers. Every output entry is owned by one thread and summed in a fixed
// order, so results do not depend on the thread count.
//
// Which layers go here is decided by conv_gemm_preferred (float32 with AVX-512, not
// depthwise, im2col(x) of at most 1 MiB; measured, see conv_gemm_cpu.cpp); the environment variable
// SPECREG_FAST_CONV_KERNEL=direct|aten|auto, read once, overrides it, as does
// specreg_fast.conv.set_conv_kernel (tests use it to run both paths on the same shapes).
#pragma once

#include <string>
#include <type_traits>

#include "../conv_geometry.h"

namespace specreg_fast {
namespace cpu {

// Geometries these kernels handle: CPU, float32/float64 weight, a non-transposed conv with
// any padding (zeros/circular/reflect/replicate, asymmetric), stride, dilation, groups, 1 to 3
// spatial dims.
bool conv_gemm_supported(const conv_detail::ConvGeom& g, const Tensor& W, const Tensor& x);

// The kernel choice: SPECREG_FAST_CONV_KERNEL as read once, at the first conv call, unless
// set_conv_kernel replaced it. An error of `op` for anything but auto/direct/aten/unset.
void check_conv_kernel_override(const char* op);
// Replaces the choice ("auto", "direct" or "aten"; a ValueError otherwise) for every later
// call; returns the previous one ("invalid" for a bad environment value). Python:
// specreg_fast.conv.set_conv_kernel.
std::string set_conv_kernel(const std::string& choice);

// Whether to use them for this layer (supported, and faster than ATen on this CPU).
bool conv_gemm_preferred(const conv_detail::ConvGeom& g, const Tensor& W, const Tensor& x);

// Scratch reused across the steps of one call.
struct ConvGemmWork {
  Tensor cols;  // K_total x L   (im2col of x)
  Tensor gcols; // K_total x L   (W^T t before col2im)
};

// x: (1, C_in, *in) contiguous; writes t (1, C_out, *out) = A x and a (1, C_in, *in) = A^T t.
// t and a must be contiguous with those shapes and W's dtype.
void conv_gemm_step(const conv_detail::ConvGeom& g, const Tensor& W, const Tensor& x, Tensor& t,
                    Tensor& a, ConvGemmWork& work);

// The weight-gradient of <y, A(W) x> (the conv weight-gradient with input x, output-gradient
// y): gw = y im2col(x)^T per group (accumulate: gw += it; where the weight_grad_by_rows form
// applies, i.e. small images, inside the GEMM's registers with no weight-sized temporary).
// x (1, C_in, *in), y (1, C_out, *out) contiguous; gw
// contiguous, W's shape and dtype.
void conv_gemm_weight_grad(const conv_detail::ConvGeom& g, const Tensor& W, const Tensor& x,
                           const Tensor& y, Tensor& gw, ConvGemmWork& work, bool accumulate = false);

// |t| of a contiguous float/double host tensor, accumulated in double in a fixed order.
double host_norm(const Tensor& t);
// dst = src / n elementwise (contiguous host tensors of one dtype; n rounded to that dtype
// first, as a division by a 0-dim tensor of the dtype would).
void host_divide(Tensor& dst, const Tensor& src, double n);

}  // namespace cpu
}  // namespace specreg_fast
