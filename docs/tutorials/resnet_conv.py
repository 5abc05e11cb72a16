# %% [markdown]
# # A ResNet with conv operator norms
#
# A convolution is a linear map from images to images. Its spectral norm at the input size it
# sees, the *operator norm*, is what bounds how much it can stretch a perturbation. It is not the
# norm of the kernel reshaped into a matrix (what `torch.nn.utils.parametrizations.spectral_norm`
# computes), nor, with zero padding, the paper's circular-padding norm. `SpectralPenalty`
# uses the operator norm by default (`conv_norm="operator"`), at the input size each conv saw on
# the first forward pass.
#
# The three norms on one layer first, against the exact answer: the largest singular value of
# the conv's explicit matrix (`specreg_fast.reference`, small sizes only).

# %%
import torch
import torch.nn as nn
import torchvision

import specreg_fast as sf
from specreg_fast import reference
from specreg_fast.geometry import ConvSpec

torch.manual_seed(0)
conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
shape = (8, 12, 12)  # (C_in, H, W): the input size the operator acts on
exact = reference.conv_sigma_exact(ConvSpec.from_module(conv, shape)).item()
operator = sf.conv_operator_norm(conv, shape).item()
circular = reference.circular_conv_sigma_exact(conv.weight.detach(), (12, 12), padding=1).item()
matrix = torch.linalg.matrix_norm(conv.weight.detach().reshape(16, -1), ord=2).item()
print(f"exact operator norm (SVD of the 2304x1152 matrix): {exact:.5f}")
print(f"sf.conv_operator_norm (power iteration on the conv): {operator:.5f}")
print(f"circular-padding norm (the paper's, conv_norm='fft'): {circular:.5f}")
print(f"reshaped-kernel matrix norm (conv_norm='matrix'):    {matrix:.5f}")

# %% [markdown]
# With zero padding the circular norm is an upper bound of the operator norm (the zero-padded
# conv is part of a circular one on a larger image); the reshaped-kernel norm is another
# quantity altogether, here far below the operator norm, so penalizing it does not control how
# much the layer stretches its input.
#
# Now a torchvision ResNet-18 (random weights, 10 classes) at 32x32. The penalty finds its 20
# convs and the readout `fc` is left free; one forward pass shows it each conv's input size.

# %%
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
penalty = sf.SpectralPenalty(model, gamma=1e-3, readout="fc")
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
for step in range(3):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    value = penalty.accumulate_grad()  # the gradient straight into .grad, no autograd
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}  penalty {value.item():.4f}")
print(len(penalty.sigmas()), "maps:", ", ".join(list(penalty.sigmas())[:4]), "...")

# %% [markdown]
# Each conv's estimate against an independent computation of the same operator norm, to a
# tolerance of 1e-7 (a fresh power iteration on the layer at the input size it saw):

# %%
penalty.eval()  # evaluate at the current weights and vectors, no power step
with torch.no_grad():
    penalty()
shapes = {}


def record(name):
    def hook(module, inputs, output):
        shapes[name] = tuple(inputs[0].shape[1:])  # (C_in, H, W) of one sample
    return hook


hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
with torch.no_grad():
    model.eval()(x[:1])
for h in hooks:
    h.remove()
print(f"{'layer':22s} {'input':>12s} {'estimate':>9s} {'converged':>9s}")
for name, est in list(penalty.sigmas().items())[:8]:
    ref = sf.conv_operator_norm(model.get_submodule(name), shapes[name], tol=1e-7).item()
    print(f"{name:22s} {str(shapes[name]):>12s} {est:9.4f} {ref:9.4f}")

# %% [markdown]
# After 20 warm-start steps and three training steps every estimate is at or below its converged
# value: power iteration approaches the norm from below, and some layers (the stem, a large
# image with few channels) converge more slowly than others. Over a training run the persistent
# vectors keep converging; `n_iter_init=` and `n_iter=` buy accuracy sooner. For a certified
# *upper* bound see [Certified bounds](certified_bounds.md).
