"""Adaptive compression: which codec a tensor travels with, from its role, size and dtype.

The defaults, and why:

================  ============================  ==========================================================
role              small (< 65,536 elements)     large
================  ============================  ==========================================================
gradient          ``fp16``                      ``blockwise8``
parameter         ``none`` (exact)              ``fp16``
optimizer state   ``none`` (exact)              ``bf16``
================  ============================  ==========================================================

- Gradients are averaged every step and make up most of the traffic. Large ones take ``blockwise8``: a
  quarter of float32's bytes, relative MSE about 6e-5 (far below a minibatch's own gradient noise), and one
  outlier only costs precision inside its 4096-value block. Small ones (biases, norm scales) cost nothing
  to send in half precision.
- Parameters are averaged into the model itself, so errors accumulate round after round: never below
  16 bits, and small parameters (the sensitive norm scales and biases) travel exactly.
- Optimizer state such as Adam's second moment spans many orders of magnitude; ``fp16`` would flush its
  small entries to zero and blow up the update, ``bf16`` keeps float32's exponent range.

Tensors that are already 16-bit never go through a 16-bit codec of the other kind (a bfloat16 parameter is
sent as ``none``: same size, exact). Integer, bool and float8 tensors are sent as ``none``, the large ones
with fast zstd on top. The size threshold and every choice are fields of :class:`AdaptiveCompression`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from volunteer.tensors.codecs import LOSSY_DTYPES, CodecId, Compression

__all__ = ["AdaptiveCompression", "TensorRole"]

_SIXTEEN_BIT = {CodecId.FP16: torch.float16, CodecId.BF16: torch.bfloat16}

# Compression is frozen, so sharing these instances as dataclass defaults is safe.
_NONE = Compression(CodecId.NONE)
_NONE_ZSTD = Compression(CodecId.NONE, zstd_level=1)
_FP16 = Compression(CodecId.FP16)
_BF16 = Compression(CodecId.BF16)
_BLOCKWISE8 = Compression(CodecId.BLOCKWISE8)


class TensorRole(enum.StrEnum):
    """What a tensor is, for the purpose of choosing its compression."""

    GRADIENT = "gradient"
    PARAMETER = "parameter"
    OPTIMIZER_STATE = "optimizer_state"


@dataclass(frozen=True, slots=True)
class AdaptiveCompression:
    """Chooses a :class:`~volunteer.tensors.codecs.Compression` per tensor (see the module docs)."""

    small_tensor_elements: int = 1 << 16
    """Tensors with fewer elements than this are "small"."""
    small_gradient: Compression = _FP16
    """Compression for small gradients."""
    large_gradient: Compression = _BLOCKWISE8
    """Compression for large gradients."""
    small_parameter: Compression = _NONE
    """Compression for small parameters."""
    large_parameter: Compression = _FP16
    """Compression for large parameters."""
    small_optimizer_state: Compression = _NONE
    """Compression for small optimizer state tensors."""
    large_optimizer_state: Compression = _BF16
    """Compression for large optimizer state tensors."""
    small_raw: Compression = _NONE
    """Compression for small integer, bool and float8 tensors."""
    large_raw: Compression = _NONE_ZSTD
    """Compression for large integer, bool and float8 tensors."""

    def choose(self, tensor: torch.Tensor, role: TensorRole) -> Compression:
        """The compression for ``tensor`` in ``role``."""
        return self.choose_for(tensor.numel(), tensor.dtype, role)

    def choose_for(self, numel: int, dtype: torch.dtype, role: TensorRole) -> Compression:
        """The compression for a tensor of ``numel`` elements of ``dtype`` in ``role``."""
        small = numel < self.small_tensor_elements
        if dtype not in LOSSY_DTYPES:
            return self.small_raw if small else self.large_raw
        match TensorRole(role):
            case TensorRole.GRADIENT:
                choice = self.small_gradient if small else self.large_gradient
            case TensorRole.PARAMETER:
                choice = self.small_parameter if small else self.large_parameter
            case TensorRole.OPTIMIZER_STATE:
                choice = self.small_optimizer_state if small else self.large_optimizer_state
        target = _SIXTEEN_BIT.get(choice.codec)
        if target is not None and dtype in _SIXTEEN_BIT.values() and dtype != target:
            # A 16-bit tensor through the other 16-bit format would lose range or precision for no bytes saved.
            return Compression(CodecId.NONE, zstd_level=choice.zstd_level)
        return choice
