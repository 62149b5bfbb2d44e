"""The table of benchmarked matrix-root configurations: covpool's methods and settings, and two peers.

Every configuration maps ``(A, inverse)`` to ``A^(±1/2)`` for a batch ``A`` of shape ``(*, n, n)``.
covpool's configurations are keyword arguments of :func:`covpool.sqrtm` / :func:`covpool.inv_sqrtm`
(with ``check_input=False``, as on a GPU by default; the peers do not validate either). The peers are
``torch.linalg.matrix_sqrth`` (square root only, when this torch has it) and ``eigh-autograd``, the
textbook ``U diag(λ^(±1/2)) Uᵀ`` differentiated by autograd through :func:`torch.linalg.eigh`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import covpool

RootFn = Callable[[torch.Tensor, bool], torch.Tensor]


@dataclass(frozen=True)
class RootConfig:
    """One benchmarked way of computing ``A^(±1/2)``.

    ``root(A, inverse)`` computes it; ``has_inverse`` is False for peers that only have a square root.
    """

    name: str
    description: str
    root: RootFn
    has_inverse: bool = True


def _covpool(**kwargs) -> RootFn:
    """``(A, inverse) ↦ covpool.(inv_)sqrtm(A, **kwargs, check_input=False)``."""

    def root(A: torch.Tensor, inverse: bool) -> torch.Tensor:
        function = covpool.inv_sqrtm if inverse else covpool.sqrtm
        return function(A, check_input=False, **kwargs)

    return root


def _eigh_autograd(A: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``U diag(λ^(±1/2)) Uᵀ`` of ``sym(A)``, differentiated by autograd through ``torch.linalg.eigh``."""
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (A + A.mT))
    powers = eigenvalues.rsqrt() if inverse else eigenvalues.sqrt()
    return (vectors * powers.unsqueeze(-2)) @ vectors.mT


def _matrix_sqrth(A: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``torch.linalg.matrix_sqrth(sym(A))`` with its own autograd (square root only)."""
    if inverse:
        raise ValueError("torch.linalg.matrix_sqrth has no inverse root; benchmark eigh-autograd instead")
    return torch.linalg.matrix_sqrth(0.5 * (A + A.mT))


def _build_configs() -> dict[str, RootConfig]:
    configs = [
        RootConfig("auto", "covpool method='auto', tol=1e-3", _covpool(method="auto", tol=1e-3)),
        RootConfig("eigh", "covpool exact eigh, Daleckii-Krein backward", _covpool(method="eigh")),
        RootConfig("mpa", "covpool scaled Padé [2/2] steps certified for tol=1e-3", _covpool(method="mpa")),
        RootConfig("mtp", "covpool minimax steps certified for tol=1e-3", _covpool(method="mtp")),
        RootConfig("mtp-tol1e-2", "covpool mtp, tol=1e-2", _covpool(method="mtp", tol=1e-2)),
        RootConfig("mtp-tol1e-5", "covpool mtp, tol=1e-5", _covpool(method="mtp", tol=1e-5)),
        RootConfig(
            "mtp-cond1e5", "covpool mtp certified for condition 1e5", _covpool(method="mtp", condition=1e5)
        ),
        RootConfig("ns3", "covpool Newton-Schulz x 3 (iSQRT-COV), autograd", _covpool(method="ns", steps=3)),
        RootConfig("ns5", "covpool Newton-Schulz x 5 (iSQRT-COV), autograd", _covpool(method="ns", steps=5)),
        RootConfig(
            "ns16",
            "covpool Newton-Schulz x 16, autograd: the fewest steps meeting 1e-3 at condition 1e3, n <= 256",
            _covpool(method="ns", steps=16),
        ),
        RootConfig("paper", "covpool.PAPER_CONFIG (Song et al. 2022)", _covpool(**covpool.PAPER_CONFIG)),
        RootConfig("eigh-autograd", "torch.linalg.eigh + autograd (peer)", _eigh_autograd),
    ]
    if hasattr(torch.linalg, "matrix_sqrth"):
        peer = RootConfig("matrix_sqrth", "torch.linalg.matrix_sqrth + autograd (peer)", _matrix_sqrth, False)
        configs.append(peer)
    return {config.name: config for config in configs}


CONFIGS: dict[str, RootConfig] = _build_configs()
"""Every benchmarked configuration by name, in the order of the report."""
