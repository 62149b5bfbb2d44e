"""iSQRT-COV classifier head: covariance pooling with matrix square-root normalisation.

Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix
Square Root Normalization", CVPR 2018. The feature map goes through an optional ``1×1`` convolution to
``d`` channels with BatchNorm and ReLU (the paper's dimension reduction, 256 by default), then the
``d × d`` covariance of its positions (centring, one batched matmul), its square root
(:func:`covpool.sqrtm`, any ``root`` options), the ``d (d + 1) / 2`` upper-triangular entries, dropout and a
linear classifier.

Differences from the paper:

- Off-diagonal entries of the vector are scaled by ``√2`` (an isometry, ``‖vec‖ = ‖Σ^(1/2)‖_F``, see
  :func:`covpool.functional.triu_vectorize`); the paper keeps them unscaled.
- A *relative* ridge ``eps`` (``Σ + eps (tr Σ / d) I``) is added before the root. With fewer positions than
  channels (e.g. ``7 × 7 = 49 < 256``) the covariance is singular, and the gradient of the exact root grows
  without bound at zero eigenvalues; the ridge keeps it finite. The paper's Newton-Schulz iteration is a
  polynomial and needs none, but this head accepts every root method.
- The covariance and the root run in float32 with autocast disabled; the features come back in the
  autocast dtype.
"""

import torch
from torch import Tensor, nn

from covpool.checks import check_choice
from covpool.functional.covariance import MIN_POSITIONS
from covpool.layers.constructor_doc import document_init
from covpool.layers.head_base import CovarianceHead
from covpool.linalg import RootOptions

INPUT_FORMATS = ("NCHW", "NLC")


@torch.jit.ignore
def checked_feature_map(x: Tensor, in_features: int, input_format: str) -> Tensor:
    """``x`` as an ``(N, C, H, W)`` map (``(N, L, C)`` tokens become ``(N, C, L, 1)``), after the checks of
    :class:`CovPoolHead`. Opaque to ``torch.fx``, a Python call under TorchScript (:mod:`.head_base`)."""
    if not torch.is_floating_point(x):
        raise TypeError(
            f"CovPoolHead: input must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    if input_format == "NCHW":
        if x.ndim != 4 or x.shape[1] != in_features:
            raise ValueError(
                f"CovPoolHead(input_format='NCHW') expects input of shape (N, {in_features}, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[2] * x.shape[3] < MIN_POSITIONS:
            raise ValueError(
                f"CovPoolHead needs feature maps of at least {MIN_POSITIONS} positions (H * W >= "
                f"{MIN_POSITIONS}), got shape {tuple(x.shape)}: the covariance of one position is zero, "
                f"so the head would give the same output for every image. Feed larger images, or use a "
                f"backbone with a smaller output stride (timm's output_stride=16 or 8; a ResNet at "
                f"output_stride=32 needs images of at least 64 px)"
            )
        # A channels-last input (token view, ConvNeXt maps) gives the 1x1 conv a weight gradient with
        # channels-last strides, which DDP reports as "Grad strides do not match bucket view strides".
        return x.contiguous()
    if x.ndim != 3 or x.shape[2] != in_features:
        raise ValueError(
            f"CovPoolHead(input_format='NLC') expects input of shape (N, L, {in_features}), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] < MIN_POSITIONS:
        raise ValueError(
            f"CovPoolHead needs at least {MIN_POSITIONS} tokens (N, L >= {MIN_POSITIONS}, C), got shape "
            f"{tuple(x.shape)}: the covariance of one token is zero, so the head would give the same "
            f"output for every input. Feed larger images or use a smaller patch size"
        )
    return x.transpose(1, 2).unsqueeze(-1).contiguous()


torch.fx.wrap("checked_feature_map")


@document_init
class CovPoolHead(CovarianceHead):
    """iSQRT-COV head: reduction, covariance, matrix square root, triu vector, classifier.

    Args:
        in_features: channels ``C`` of the input feature map.
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns the features).
        reduction_dim: ``d`` of the ``1×1`` conv + BN + ReLU reduction; ``None`` for none (``d = C``).
        root: options of the matrix square root (:class:`covpool.RootOptions`, a method name, or a dict
            of its fields; default ``"auto"``), passed unchanged to :func:`covpool.sqrtm`.
        drop_rate: dropout on the pooled features.
        input_format: ``"NCHW"`` feature maps or ``"NLC"`` token sequences.
        eps: relative ridge before the root (see the module docstring).
        pool_type: ``"cov"`` (default, the covariance pooling) or ``""`` (no pooling, with
            ``num_classes=0``: ``forward`` returns its input, timm's unpooled convention).
        device: where the parameters and buffers are created (a factory argument, as in torch.nn).
        dtype: the dtype the parameters and buffers are created in (a factory argument).

    Attributes:
        num_features: width of the pre-logits features, ``d (d + 1) / 2``.
        in_features: ``C``.

    Raises:
        TypeError: in ``forward``, input that is not floating point.
        ValueError: in ``forward``, input of fewer than 2 positions (``H * W < 2`` or ``L < 2``), whose
            covariance is zero whatever the input; a batch the head rejects (NaN/Inf, a covariance the root
            refuses, reduction statistics that overflow), which leaves every buffer unchanged.

    Shape:
        - input: :math:`(N, C, H, W)` or :math:`(N, L, C)`, ``H * W >= 2`` or ``L >= 2``
        - output: :math:`(N, d (d + 1) / 2)` with ``pre_logits=True``, else :math:`(N, \\text{num_classes})`

    Example:
        >>> head = CovPoolHead(64, 10, reduction_dim=16)
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 10])
        >>> head.num_features, head(torch.randn(2, 64, 7, 7), pre_logits=True).shape
        (136, torch.Size([2, 136]))
    """

    POOL_TYPE = "cov"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        reduction_dim: int | None = 256,
        root: RootOptions | str | dict | None = None,
        drop_rate: float = 0.0,
        input_format: str = "NCHW",
        eps: float = 1e-4,
        pool_type: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, root=root, eps=eps, pool_type=pool_type, device=device, dtype=dtype)
        check_choice(input_format, "input_format", INPUT_FORMATS)
        self.input_format = input_format
        dim = self._build_reduction(
            reduction_dim,
            lambda d: nn.Sequential(
                nn.Conv2d(in_features, d, kernel_size=1, bias=False, **self._factory),
                nn.BatchNorm2d(d, **self._factory),
                nn.ReLU(inplace=True),
            ),
        )
        self._build_classifier(dim * (dim + 1) // 2, num_classes, drop_rate)

    def _pooled_features(self, x: Tensor) -> Tensor:
        reduced = self.reduce(checked_feature_map(x, self.in_features, self.input_format))
        return self._pool(reduced.flatten(2).transpose(1, 2))
