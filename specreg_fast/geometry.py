"""Conv layer geometry: a conv layer seen as a linear map at one input size.

A neutral module: the fast paths (``conv.py``, ``fft.py``, ``bounds.py``), the penalty and
the plain references in ``reference.py`` all take a :class:`ConvSpec`; keeping it here keeps
``reference.py`` a leaf that only checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["ConvSpec"]


@dataclass
class ConvSpec:
    """A conv layer seen as the linear map x -> conv(x) (no bias) at one input size.

    ``input_shape`` is ``(C_in, *spatial)`` for one sample. ``transposed`` selects
    ConvTranspose semantics (weight shape ``(C_in, C_out/groups, *k)``).
    """

    weight: torch.Tensor
    input_shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Union[str, Tuple[int, ...]]
    dilation: Tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: Tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2

    @classmethod
    def from_module(cls, m: nn.Module, input_shape: Sequence[int], weight: Optional[torch.Tensor] = None):
        if not isinstance(m, nn.modules.conv._ConvNd):
            raise TypeError(f"expected a torch.nn ConvNd/ConvTransposeNd module, got {type(m).__name__}")
        w = m.weight if weight is None else weight
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != w.dim() - 1:
            raise ValueError(
                f"input_shape must be (C_in, *spatial) with {w.dim() - 2} spatial dims, got {input_shape}")
        return cls(weight=w, input_shape=input_shape, stride=tuple(m.stride), padding=m.padding
                   if isinstance(m.padding, str) else tuple(m.padding), dilation=tuple(m.dilation),
                   groups=m.groups, padding_mode=m.padding_mode, transposed=m.transposed,
                   output_padding=tuple(m.output_padding))

    def _module(self) -> nn.Module:
        d = self.ndim
        k = tuple(self.weight.shape[2:])
        if self.transposed:
            cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][d - 1]
            cin, cout = self.weight.shape[0], self.weight.shape[1] * self.groups
            return cls(cin, cout, k, stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                       groups=self.groups, bias=False, dilation=self.dilation, padding_mode=self.padding_mode,
                       device="meta")
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][d - 1]
        cout, cin = self.weight.shape[0], self.weight.shape[1] * self.groups
        return cls(cin, cout, k, stride=self.stride, padding=self.padding, dilation=self.dilation,
                   groups=self.groups, bias=False, padding_mode=self.padding_mode, device="meta")
