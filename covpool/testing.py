"""Reference matrices and exact references for tests and benchmarks.

Everything here is computed in float64 by eigendecomposition, so it can serve as ground truth for the
fast methods in :mod:`covpool.linalg`.
"""

from __future__ import annotations

import torch


def random_spd(
    *batch_shape: int,
    n: int,
    condition: float = 1e3,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random SPD matrices ``U diag(λ) Uᵀ`` with a geometric spectrum from 1 down to ``1 / condition``.

    The eigenvectors ``U`` are Haar-random. A geometric spectrum puts eigenvalues at every scale of the
    range, which is where fixed-degree series lose accuracy.

    Shape: ``(*batch_shape, n, n)``.
    """
    if condition < 1:
        raise ValueError(f"condition must be >= 1, got {condition}")
    gaussian = torch.randn(*batch_shape, n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    exponents = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    eigenvalues = condition ** (-exponents)
    spd = (q * eigenvalues) @ q.mT
    spd = 0.5 * (spd + spd.mT)
    return spd.to(dtype=dtype, device=device)


def random_covariance(
    *batch_shape: int,
    n: int,
    samples: int,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample covariances of ``samples`` correlated Gaussian vectors in ``n`` dimensions.

    Rank-deficient when ``samples <= n``. Shape: ``(*batch_shape, n, n)``.
    """
    mixing = torch.randn(*batch_shape, n, n, dtype=torch.float64, generator=generator)
    x = torch.randn(*batch_shape, samples, n, dtype=torch.float64, generator=generator) @ mixing
    x = x - x.mean(dim=-2, keepdim=True)
    return (x.mT @ x / samples).to(dtype)


def user_ridged_covariance(
    batch: int, n: int, condition: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A sample covariance the user ridged: rank ``n / 2``, plus ``λmax / condition`` on the diagonal
    (float64; beyond a root's assumed bound when ``condition`` exceeds it). Shape: ``(batch, n, n)``."""
    C = random_covariance(batch, n=n, samples=n // 2, generator=generator)
    top = torch.linalg.eigvalsh(C)[..., -1:, None]
    return C + top / condition * torch.eye(n, dtype=C.dtype)


def clustered_spd(
    batch: int, n: int, condition: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SPD matrices with Haar-random eigenvectors, eigenvalues 1 and 0.5 and every other one at
    ``1 / condition``: the spectrum piled on the lower end of a bound, where rounding relative to the
    largest eigenvalue weighs most (float64). Shape: ``(batch, n, n)``."""
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    values = torch.full((batch, n), 1.0 / condition, dtype=torch.float64)
    values[:, -2:] = torch.tensor([0.5, 1.0], dtype=torch.float64)
    return (q * values[:, None, :]) @ q.mT


SPECTRUM_KINDS = ("spd", "ridged", "clustered")
"""The input families :func:`bounded_matrices` makes."""


def bounded_matrices(
    kind: str, batch: int, n: int, condition: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``batch`` float64 matrices of condition ``condition``: ``"spd"`` (:func:`random_spd`, a geometric
    spectrum), ``"ridged"`` (:func:`user_ridged_covariance`) or ``"clustered"`` (:func:`clustered_spd`).
    Shape: ``(batch, n, n)``."""
    if kind == "spd":
        return random_spd(batch, n=n, condition=condition, generator=generator)
    if kind == "ridged":
        return user_ridged_covariance(batch, n, condition, generator)
    if kind == "clustered":
        return clustered_spd(batch, n, condition, generator)
    raise ValueError(f"kind must be one of {SPECTRUM_KINDS}, got {kind!r}")


def reference_root(A: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Exact ``A^(±1/2)`` of symmetric PD ``A`` in float64. Shape: ``(*, n, n)``."""
    eigenvalues, vectors = torch.linalg.eigh(A.double())
    values = eigenvalues.clamp_min(0).sqrt()
    values = values.reciprocal() if inverse else values
    return (vectors * values.unsqueeze(-2)) @ vectors.mT


def reference_gradient(A: torch.Tensor, grad: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Exact gradient ``∂L/∂A`` of ``L`` through ``A^(±1/2)`` by the Daleckii-Krein formula, in float64.

    ``grad`` is ``∂L/∂(A^(±1/2))``; only its symmetric part matters. Shapes: ``(*, n, n)`` each.
    """
    eigenvalues, vectors = torch.linalg.eigh(A.double())
    roots = eigenvalues.clamp_min(0).sqrt()
    first_differences = 1.0 / (roots.unsqueeze(-1) + roots.unsqueeze(-2))
    if inverse:
        first_differences = -first_differences / (roots.unsqueeze(-1) * roots.unsqueeze(-2))
    grad = grad.double()
    inner = vectors.mT @ (0.5 * (grad + grad.mT)) @ vectors
    return vectors @ (first_differences * inner) @ vectors.mT


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error per matrix, ``‖approx - exact‖_F / ‖exact‖_F``. Shape: ``(*,)``."""
    difference = approx.double() - exact.double()
    return torch.linalg.matrix_norm(difference) / torch.linalg.matrix_norm(exact.double())


RELATIVE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}
"""Relative Frobenius error allowed per dtype against a float64 reference at the default ``tol=1e-3``.

float64 is held to the same 1e-3: the schedules are certified for ``tol``, not for the dtype; tests that
ask for a smaller ``tol`` pass it to :func:`assert_relative_close` themselves.
"""


def assert_relative_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float | None = None, what: str = "result"
) -> None:
    """Assert ``relative_error(actual, expected) <= rtol`` for every matrix, with a message saying where.

    ``rtol`` defaults to :data:`RELATIVE_TOLERANCE` of ``actual``'s dtype. Shapes ``(*, n, n)``; vectors and
    other shapes are compared as one matrix per leading entry (``(*, m)`` → ``(*, m, 1)``).

    Example:
        >>> assert_relative_close(torch.eye(2), torch.eye(2) * (1 + 1e-5), rtol=1e-4)
    """
    if rtol is None:
        rtol = RELATIVE_TOLERANCE[actual.dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.ndim < 2:
        actual, expected = actual.reshape(1, -1, 1), expected.reshape(1, -1, 1)
    elif actual.ndim == 2:
        actual, expected = actual[..., None], expected[..., None]
    errors = relative_error(actual, expected)
    worst = errors.flatten().argmax().item() if errors.numel() else 0
    if not bool((errors <= rtol).all()):
        raise AssertionError(
            f"{what}: relative error {errors.flatten()[worst].item():.3g} > {rtol:g} at batch entry {worst} "
            f"(dtype {actual.dtype}, {int((errors > rtol).sum())} of {errors.numel()} entries over)"
        )
