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
from typing import Any

import torch

import covpool
from covpool.linalg import RootOptions
from covpool.linalg.planner import plan_root
from covpool.numerics import working_dtype

RootFn = Callable[[torch.Tensor, bool], torch.Tensor]


@dataclass(frozen=True)
class RootConfig:
    """One benchmarked way of computing ``A^(±1/2)``.

    ``root(A, inverse)`` computes it; ``has_inverse`` is False for peers that only have a square root;
    ``options`` are the keyword options of covpool's configurations (None for the peers).
    """

    name: str
    description: str
    root: RootFn
    has_inverse: bool = True
    options: dict[str, Any] | None = None

    def runs(self, device: str, dtype: str, n: int) -> str:
        """The method this configuration runs on ``device`` in ``dtype`` at size ``n``: what
        ``method="auto"`` resolves to there, a covpool configuration's own method, a peer's name."""
        if self.options is None:
            return self.name
        working = working_dtype(getattr(torch, dtype))
        return plan_root(
            RootOptions(**self.options), n, eps=0.0, device=torch.device(device), dtype=working
        ).method


def _covpool(name: str, description: str, **options) -> RootConfig:
    """The configuration ``(A, inverse) ↦ covpool.(inv_)sqrtm(A, **options, check_input=False)``."""

    def root(A: torch.Tensor, inverse: bool) -> torch.Tensor:
        function = covpool.inv_sqrtm if inverse else covpool.sqrtm
        return function(A, check_input=False, **options)

    return RootConfig(name, description, root, options=options)


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
        _covpool("auto", "covpool method='auto', tol=1e-3", method="auto", tol=1e-3),
        _covpool("eigh", "covpool exact eigh, Daleckii-Krein backward", method="eigh"),
        _covpool("mpa", "covpool scaled Padé [2/2] steps certified for tol=1e-3", method="mpa"),
        _covpool("mtp", "covpool minimax steps certified for tol=1e-3", method="mtp"),
        _covpool("mtp-tol1e-2", "covpool mtp, tol=1e-2", method="mtp", tol=1e-2),
        _covpool("mtp-tol1e-5", "covpool mtp, tol=1e-5", method="mtp", tol=1e-5),
        _covpool("mtp-cond1e5", "covpool mtp certified for condition 1e5", method="mtp", condition=1e5),
        _covpool("ns3", "covpool Newton-Schulz x 3 (iSQRT-COV), autograd", method="ns", steps=3),
        _covpool("ns5", "covpool Newton-Schulz x 5 (iSQRT-COV), autograd", method="ns", steps=5),
        _covpool(
            "ns16",
            "covpool Newton-Schulz x 16, autograd: the fewest steps meeting 1e-3 at condition 1e3, n <= 256",
            method="ns",
            steps=16,
        ),
        _covpool("paper", "covpool.PAPER_CONFIG (Song et al. 2022)", **covpool.PAPER_CONFIG),
        RootConfig("eigh-autograd", "torch.linalg.eigh + autograd (peer)", _eigh_autograd),
    ]
    if hasattr(torch.linalg, "matrix_sqrth"):
        peer = RootConfig("matrix_sqrth", "torch.linalg.matrix_sqrth + autograd (peer)", _matrix_sqrth, False)
        configs.append(peer)
    return {config.name: config for config in configs}


CONFIGS: dict[str, RootConfig] = _build_configs()
"""Every benchmarked configuration by name, in the order of the report."""
