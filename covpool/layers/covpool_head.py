"""iSQRT-COV classifier head: covariance pooling with matrix square-root normalisation.

Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix
Square Root Normalization", CVPR 2018. The feature map goes through an optional ``1×1`` convolution to
``d`` channels with BatchNorm and ReLU (the paper's dimension reduction, 256 by default), then the
``d × d`` covariance of its positions (centring, one batched matmul), its square root
(:func:`covpool.sqrtm`, any ``method``), the ``d (d + 1) / 2`` upper-triangular entries, dropout and a
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

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from covpool.functional.covariance import sqrt_covariance_pool
from covpool.linalg import METHODS
from covpool.linalg.checks import check_choice, check_positive_int

INPUT_FORMATS = ("NCHW", "NLC")


def make_classifier(
    num_features: int, num_classes: int, like: nn.Module, factory: dict
) -> nn.Linear | nn.Identity:
    """Linear classifier, or :class:`torch.nn.Identity` for ``num_classes=0`` (as in timm).

    The classifier is created on the device and dtype of ``like``'s parameters when it has any, so that
    ``reset`` after ``.to(...)`` lands next to the rest of the head; else with ``factory``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if num_classes == 0:
        return nn.Identity()
    reference = next(like.parameters(), None)
    if reference is not None:
        factory = {"device": reference.device, "dtype": reference.dtype}
    return nn.Linear(num_features, num_classes, **factory)


def check_pool_type(pool_type: str | None) -> None:
    """``reset`` accepts ``pool_type=None`` only: the pooling of a covariance head is fixed."""
    if pool_type is not None:
        raise ValueError(
            f"pool_type must be None for a covariance-pooling head (its pooling is fixed), got {pool_type!r}"
        )


class CovPoolHead(nn.Module):
    """iSQRT-COV head: reduction, covariance, matrix square root, triu vector, classifier.

    Args:
        in_features: channels ``C`` of the input feature map.
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns the features).
        reduction_dim: ``d`` of the ``1×1`` conv + BN + ReLU reduction; ``None`` for none (``d = C``).
        method: algorithm of :func:`covpool.sqrtm`.
        drop_rate: dropout on the pooled features.
        input_format: ``"NCHW"`` feature maps or ``"NLC"`` token sequences.
        eps: relative ridge before the root (see the module docstring).

    Attributes:
        num_features: width of the pre-logits features, ``d (d + 1) / 2``.
        in_features: ``C``.

    Shape:
        - input: :math:`(N, C, H, W)` or :math:`(N, L, C)`
        - output: :math:`(N, d (d + 1) / 2)` with ``pre_logits=True``, else :math:`(N, \\text{num_classes})`

    Example:
        >>> head = CovPoolHead(64, 10, reduction_dim=16)
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 10])
        >>> head.num_features, head(torch.randn(2, 64, 7, 7), pre_logits=True).shape
        (136, torch.Size([2, 136]))
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        reduction_dim: int | None = 256,
        method: str = "auto",
        drop_rate: float = 0.0,
        input_format: str = "NCHW",
        eps: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_choice(method, "method", METHODS)
        check_choice(input_format, "input_format", INPUT_FORMATS)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self._factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.input_format = input_format
        self.method = method
        self.eps = eps
        if reduction_dim is None:
            self.reduce = nn.Identity()
            dim = in_features
        else:
            check_positive_int(reduction_dim, "reduction_dim")
            self.reduce = nn.Sequential(
                nn.Conv2d(in_features, reduction_dim, kernel_size=1, bias=False, **self._factory),
                nn.BatchNorm2d(reduction_dim, **self._factory),
                nn.ReLU(inplace=True),
            )
            dim = reduction_dim
        self.num_features = dim * (dim + 1) // 2
        self.drop = nn.Dropout(drop_rate)
        self.fc = make_classifier(self.num_features, num_classes, self, self._factory)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: identity)."""
        check_pool_type(pool_type)
        self.fc = make_classifier(self.num_features, num_classes, self, self._factory)

    def _feature_map(self, x: Tensor) -> Tensor:
        if self.input_format == "NCHW":
            if x.ndim != 4 or x.shape[1] != self.in_features:
                raise ValueError(
                    f"CovPoolHead(input_format='NCHW') expects input of shape (N, {self.in_features}, H, W), "
                    f"got shape {tuple(x.shape)}"
                )
            return x
        if x.ndim != 3 or x.shape[2] != self.in_features:
            raise ValueError(
                f"CovPoolHead(input_format='NLC') expects input of shape (N, L, {self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )
        return rearrange(x, "n l c -> n c l 1")

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.reduce(self._feature_map(x))
        pooled = sqrt_covariance_pool(rearrange(x, "n c h w -> n (h w) c"), method=self.method, eps=self.eps)
        pooled = self.drop(pooled)
        return pooled if pre_logits else self.fc(pooled)
