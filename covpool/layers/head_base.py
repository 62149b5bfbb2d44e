"""What the covariance-pooling heads share: option checks, the optional reduction, the classifier and
timm's ``reset``. Each head adds only how it turns its input into pooled features."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from covpool.checks import check_float, check_positive_int
from covpool.linalg import RootOptions


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


class CovarianceHead(nn.Module):
    """Base of :class:`covpool.CovPoolHead` and :class:`covpool.SecondOrderTokenHead`.

    Subclasses call :meth:`_build_reduction` and then :meth:`_build_classifier` in their constructor.
    """

    def __init__(
        self,
        in_features: int,
        *,
        root: RootOptions | str | dict | None,
        eps: float,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        self.root = RootOptions.coerce(root)
        check_float(eps, f"{type(self).__name__}: eps")
        self._factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.eps = eps

    def _build_reduction(self, reduction_dim: int | None, build: Callable[[int], nn.Module]) -> int:
        """Set ``self.reduce`` to ``build(reduction_dim)`` (identity for ``None``); returns its width."""
        if reduction_dim is None:
            self.reduce = nn.Identity()
            return self.in_features
        check_positive_int(reduction_dim, "reduction_dim")
        self.reduce = build(reduction_dim)
        return reduction_dim

    def _build_classifier(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = num_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = make_classifier(num_features, num_classes, self, self._factory)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: identity).

        ``pool_type`` must be None: the pooling of a covariance head is fixed.
        """
        if pool_type is not None:
            raise ValueError(
                "pool_type must be None for a covariance-pooling head (its pooling is fixed), "
                f"got {pool_type!r}"
            )
        self.fc = make_classifier(self.num_features, num_classes, self, self._factory)
