"""The process-wide count of matrices the roots flagged (returned NaN for, or raised on).

The roots add to it on the device, without a synchronisation (:func:`count_flagged`); a user reads it with
:func:`flagged_matrices` where a host read is cheap.
"""

from __future__ import annotations

import torch

from covpool.numerics import is_tracing

_flagged: dict[torch.device, torch.Tensor] = {}


def count_flagged(valid: torch.Tensor) -> None:
    """Add the number of unset flags of ``valid`` to its device's count of flagged matrices, on the
    device (no synchronisation; three kernels). Not while tracing, where the graph's NaN still marks them,
    nor on fake tensors, which cannot keep a count (so ``python -m covpool.bench --trace`` leaves those
    three kernels out)."""
    if is_tracing() or valid.numel() == 0 or torch._subclasses.fake_tensor.is_fake(valid):
        return
    count = _flagged.get(valid.device)
    if count is None:
        count = _flagged[valid.device] = torch.zeros((), dtype=torch.int64, device=valid.device)
    count.add_((~valid).sum())


def flagged_matrices(*, reset: bool = False) -> int:
    """How many matrices the roots have flagged (returned NaN for, or raised on) since the start or the
    last reset, over every device. The roots count on the device, without a synchronisation, so a NaN
    that the sync-free CUDA path returns is still counted; reading the count synchronises once per
    device: call it where a host read is cheap (a logging step, the end of an epoch). Not counted:
    calls traced by ``torch.compile``/``torch.export`` (their NaN still marks the matrix).

    Example:
        >>> import torch, covpool
        >>> _ = covpool.flagged_matrices(reset=True)
        >>> _ = covpool.sqrtm(-torch.eye(3).expand(2, 3, 3), method="mtp", check_input=False)
        >>> covpool.flagged_matrices(reset=True)
        2
        >>> covpool.flagged_matrices()
        0
    """
    total = sum(int(count) for count in _flagged.values())
    if reset:
        for count in _flagged.values():
            count.zero_()
    return total
