"""Decorrelated batch normalisation: group ZCA whitening of channels, then a per-channel affine.

Huang et al., "Decorrelated Batch Normalization", CVPR 2018 (DBN), and "Iterative Normalization:
Beyond Standardization towards Efficient Whitening", CVPR 2019 (IterNorm). Per group of ``g``
channels the layer computes ``(Σ + eps I)^(-1/2) (x - μ)`` with ``μ, Σ`` over every position of every
sample (``(N, H, W)`` for images, ``(N, L)`` for sequences), then ``γ ⊙ · + β`` per channel like
:class:`torch.nn.BatchNorm2d`. The inverse root is :func:`covpool.inv_sqrtm` (``root`` selects the
algorithm: eigendecomposition for DBN, Newton-Schulz for IterNorm, ...); gradients flow through the
mean, the covariance and the root.

Design choices:

- **Running covariance, not a running whitening matrix.** DBN and IterNorm average the whitening
  matrices ``Σ_B^(-1/2)`` of the training batches. This layer averages the covariances ``Σ_B`` instead
  and computes ``(Σ̂ + eps I)^(-1/2)`` once at evaluation, cached until the running statistics change.
  The average of inverse roots is not the inverse root of the average: by operator convexity of
  ``t ↦ t^(-1/2)``, ``E[Σ_B^(-1/2)] ⪰ (E Σ_B)^(-1/2)``, and the gap grows with the noise of ``Σ_B``, i.e.
  with the group size and small batches, where the small eigenvalues of ``Σ_B`` are underestimated.
  The covariance average is unbiased (with the ``n / (n - 1)`` correction, like BatchNorm's
  ``running_var``), does not depend on the root method, and is a linear statistic. Huang et al.,
  "An Investigation into the Stochasticity of Batch Whitening" (CVPR 2020), compare the two estimates
  and show that the choice matters for inference accuracy.
- **Cache invalidation.** The cached evaluation matrix is keyed on the storage and version counter of
  ``running_cov`` together with ``eps`` and ``root``, and is also dropped on ``train()``/``eval()``,
  ``load_state_dict`` and :meth:`reset_running_stats`. It is not part of the ``state_dict``. Under
  tracing (``torch.compile``, ``torch.export``, ONNX export) there is no cache: the whitening matrix is
  computed in the graph from ``running_cov``, so an exported model carries the buffer, not a snapshot.
- **eps is absolute**, like BatchNorm's: ``Σ + eps I``. (The ``eps`` of :func:`covpool.inv_sqrtm` is
  relative to the mean eigenvalue and is left at 0 here.) With fewer samples than ``g`` the batch
  covariance is singular and ``eps`` is what keeps the whitening finite.
- **Statistics in float64.** Each rank forms ``(count, Σx, Σxxᵀ)`` (about its local mean, then
  promoted, see :mod:`covpool.functional.whitening`); under ``torch.distributed`` they are summed over
  ``process_group`` with a differentiable all-reduce (any backend, gloo on CPU included, uneven batch
  sizes allowed), so outputs and input gradients equal those of one process seeing the union batch.
  The whitening itself runs in float32 (float64 inputs stay float64) with autocast disabled; the
  output has the input dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from timm.layers import register_notrace_module
from torch import Tensor, nn

from covpool.checks import check_float, check_momentum, check_positive_int, nonfinite_samples, reads_values
from covpool.functional.distributed import all_reduce_sum, is_distributed
from covpool.functional.whitening import (
    group_statistics,
    group_whiten,
    moments_from_statistics,
    whitening_matrix,
)
from covpool.layers.constructor_doc import document_init
from covpool.linalg import RootOptions
from covpool.numerics import working_dtype


class _ZCABatchNorm(nn.Module):
    """Shared implementation; subclasses map their input layout to rows ``(M, C)`` and back."""

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int = 16,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        root: RootOptions | str | dict | None = None,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_features, "num_features")
        check_positive_int(group_size, "group_size")
        if num_features % group_size != 0:
            divisors = [d for d in range(1, num_features + 1) if num_features % d == 0]
            raise ValueError(
                f"group_size must divide num_features={num_features}, got group_size={group_size}; "
                f"divisors of {num_features}: {divisors}"
            )
        self.root = RootOptions.coerce(root)
        check_float(eps, f"{type(self).__name__}: eps")
        check_momentum(momentum, f"{type(self).__name__}: momentum")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.group_size = group_size
        self.num_groups = num_features // group_size
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.process_group = process_group
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            eye = torch.eye(group_size, **factory).expand(self.num_groups, group_size, group_size)
            self.register_buffer("running_cov", eye.clone())
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_cov", None)
            self.register_buffer("num_batches_tracked", None)
        self._eval_cache: tuple[tuple, Tensor] | None = None

    def _to_rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        raise NotImplementedError

    def reset_running_stats(self) -> None:
        """Running mean to 0, running covariance to ``I`` per group, batch counter to 0."""
        self._eval_cache = None
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_cov.copy_(torch.eye(self.group_size).expand_as(self.running_cov))
            self.num_batches_tracked.zero_()

    def train(self, mode: bool = True) -> _ZCABatchNorm:
        self._eval_cache = None
        return super().train(mode)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        self._eval_cache = None
        saved = state_dict.get(prefix + "running_cov")
        if self.running_cov is not None and saved is not None and saved.shape != self.running_cov.shape:
            seen = (
                f"group_size={saved.shape[-1]} ({saved.shape[0]} groups)"
                if saved.ndim == 3 and saved.shape[0] * saved.shape[-1] == self.num_features
                else f"a running_cov of shape {tuple(saved.shape)}"
            )
            error_msgs.append(
                f"{type(self).__name__} '{prefix[:-1] or '<root>'}': the state was saved with {seen}, this "
                f"layer has group_size={self.group_size} ({self.num_groups} groups of {self.num_features} "
                f"channels); create it with the group_size of the saved state"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript cannot express this layer: ``torch.jit.script`` gets this error instead of its own."""
        raise TypeError(
            f"{type(self).__name__} cannot be compiled by TorchScript (torch.jit.script): its whitening "
            "calls covpool's matrix roots, which TorchScript cannot express (autograd Functions, a "
            "dataclass of options, Python control flow on values). Deploy with "
            "torch.export.export(model.eval(), ...) or covpool.export_onnx(model.eval(), ...), or compile "
            "with torch.compile"
        )

    def _batch_moments(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(count, mean, cov)`` of the batch, over all ranks of ``process_group`` when training."""
        synchronised = self.training and is_distributed(self.process_group)
        if self.training and not synchronised and rows.shape[0] < 2:
            raise ValueError(
                f"{type(self).__name__} needs more than 1 value per channel when training, got "
                f"{rows.shape[0]} (input flattened to rows of shape {tuple(rows.shape)})"
            )
        statistics = group_statistics(rows, self.group_size)
        if synchronised:
            statistics = all_reduce_sum(*statistics, process_group=self.process_group)
        count = statistics[0]
        return (count, *moments_from_statistics(*statistics))

    @torch.no_grad()
    def _update_running_stats(self, count: Tensor, mean: Tensor, cov: Tensor) -> None:
        """Fold the batch into the running statistics, unless it holds NaN/Inf.

        A non-finite batch changes nothing, not even the counter, without reading any value on the host:
        the update is selected on the device (``torch.where``), so the layer stays capturable.
        """
        finite = torch.isfinite(cov).all() & torch.isfinite(mean).all()
        self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))
        if self.momentum is None:  # cumulative average
            factor = finite / self.num_batches_tracked.clamp_min(1).to(self.running_mean.dtype)
        else:
            factor = finite.to(self.running_mean.dtype) * self.momentum
        unbiased = cov * (count / (count - 1).clamp_min(1))
        new_mean = torch.where(finite, mean.reshape(-1).to(self.running_mean.dtype), self.running_mean)
        new_cov = torch.where(finite, unbiased.to(self.running_cov.dtype), self.running_cov)
        self.running_mean.lerp_(new_mean, factor)
        self.running_cov.lerp_(new_cov, factor)

    def _eval_whitening(self, dtype: torch.dtype) -> Tensor:
        """``(running_cov + eps I)^(-1/2)``, recomputed only when its inputs changed.

        Traced (``torch.compile``, ``torch.export``, ``torch.jit.trace`` and the ONNX exporters), it is
        computed in the graph from ``running_cov`` instead: a tracer cannot read the storage pointer and
        version counter that key the cache, and the graph then follows the buffer whatever its value.
        """
        cov = self.running_cov
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return whitening_matrix(cov.to(dtype), eps=self.eps, root=self.root)
        key = (
            cov.data_ptr(),
            cov._version,
            cov.device,
            dtype,
            self.eps,
            self.root,
            torch.is_inference_mode_enabled(),
        )
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                whitening = self._whitening(cov.to(dtype))
            self._eval_cache = (key, whitening)
        return self._eval_cache[1]

    def _whitening(self, cov: Tensor) -> Tensor:
        """:func:`whitening_matrix` of ``cov`` (``(G, g, g)``); a refusal (host checks) names this layer."""
        try:
            return whitening_matrix(cov, eps=self.eps, root=self.root)
        except ValueError as error:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}, group_size={self.group_size}): a group's "
                f"covariance cannot be whitened with root={self.root!r}: {error}. For this layer, raise "
                f"eps (now {self.eps:g}), use smaller groups, or root='eigh'; the batch was rejected and the "
                "running statistics are unchanged"
            ) from error

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"{type(self).__name__}: input must be a floating-point tensor, got {x.dtype}")
        rows = self._to_rows(x)
        if reads_values(self.root.check_input, x.device) and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{type(self).__name__}: input holds NaN or Inf in samples {nonfinite_samples(x)} of "
                f"{x.shape[0]} (shape {tuple(x.shape)}, layer {type(self).__name__}({self.num_features}, "
                f"group_size={self.group_size})); the batch was rejected and the running statistics are "
                "unchanged"
            )
        work = working_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.training or not self.track_running_stats:
                count, mean, cov = self._batch_moments(rows)
                # Whitened before the update, so that a rejected batch changes nothing.
                whitening = self._whitening(cov.to(work))
                if self.training and self.track_running_stats:
                    self._update_running_stats(count, mean, cov)
            else:
                mean = rearrange(self.running_mean, "(G g) -> G g", g=self.group_size)
                whitening = self._eval_whitening(work)
            out = group_whiten(rows, mean, whitening)
            if self.affine:
                out = out * self.weight.to(work) + self.bias.to(work)
        return self._from_rows(out.to(x.dtype), x)

    def _check_channels(self, x: Tensor, channels: int, layout: str) -> None:
        if channels != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input of layout {layout} must have C={self.num_features} "
                f"channels, got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, group_size={self.group_size}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, root={self.root}"
        )


@register_notrace_module  # a leaf of timm's fx feature extraction (torchvision: pass it in leaf_modules)
@document_init
class ZCABatchNorm2d(_ZCABatchNorm):
    """Group ZCA whitening of the channels of ``(N, C, H, W)`` maps, statistics over ``(N, H, W)``.

    See the module docstring for the design (running covariance, absolute ``eps``, synchronisation).

    Args:
        num_features: channels ``C``.
        group_size: channels per whitened group ``g``; must divide ``C`` (``g = 1`` is BatchNorm).
        eps: absolute ridge, ``(Σ + eps I)^(-1/2)``, like BatchNorm's ``eps``.
        momentum: running-statistics factor; ``None`` for a cumulative average, as in BatchNorm.
        affine: learn a per-channel scale and shift after whitening.
        track_running_stats: keep running mean and covariance for evaluation; without them evaluation
            uses batch statistics.
        root: options of the inverse square root (:class:`covpool.RootOptions`, a method name, or a dict
            of its fields; default ``"auto"``), passed unchanged to :func:`covpool.inv_sqrtm`.
        process_group: group whose ranks share statistics in training (default: the world) when
            ``torch.distributed`` is initialised with more than one rank.
        device: where the parameters and buffers are created (a factory argument, as in torch.nn).
        dtype: the dtype the parameters and buffers are created in (a factory argument).

    Shape:
        - input: :math:`(N, C, H, W)`
        - output: :math:`(N, C, H, W)`, input dtype

    Example:
        >>> layer = ZCABatchNorm2d(8, group_size=4)
        >>> layer(torch.randn(16, 8, 5, 5)).shape
        torch.Size([16, 8, 5, 5])
    """

    def _to_rows(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"ZCABatchNorm2d expects input of shape (N, C, H, W), got {tuple(x.shape)}")
        self._check_channels(x, x.shape[1], "(N, C, H, W)")
        return rearrange(x, "n c h w -> (n h w) c")

    def _from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        n, _, h, w = like.shape
        return rearrange(rows, "(n h w) c -> n c h w", n=n, h=h, w=w)


@register_notrace_module
@document_init(args_from=ZCABatchNorm2d)
class ZCABatchNorm1d(_ZCABatchNorm):
    """Group ZCA whitening of features ``(N, C)`` or channels-last sequences ``(N, L, C)``.

    Statistics are over ``N`` (and ``L``). Note the channels-last layout for sequences, as tokens come
    in transformers; :class:`torch.nn.BatchNorm1d` takes ``(N, C, L)`` instead. Arguments as in
    :class:`ZCABatchNorm2d`.

    Shape:
        - input: :math:`(N, C)` or :math:`(N, L, C)`
        - output: same as input, input dtype

    Example:
        >>> layer = ZCABatchNorm1d(8, group_size=8)
        >>> layer(torch.randn(4, 10, 8)).shape
        torch.Size([4, 10, 8])
    """

    def _to_rows(self, x: Tensor) -> Tensor:
        if x.ndim not in (2, 3):
            raise ValueError(
                f"ZCABatchNorm1d expects input of shape (N, C) or (N, L, C), got shape {tuple(x.shape)}"
            )
        self._check_channels(x, x.shape[-1], "(N, C) or (N, L, C)")
        return x if x.ndim == 2 else rearrange(x, "n l c -> (n l) c")

    def _from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        return rows if like.ndim == 2 else rearrange(rows, "(n l) c -> n l c", n=like.shape[0])
