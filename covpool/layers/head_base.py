"""What the covariance-pooling heads share: option checks, the optional reduction, the classifier, timm's
``reset`` (``pool_type=""`` included), the guard that leaves every buffer unchanged by a rejected batch,
and the form that ``torch.fx`` and TorchScript can take.

Tracing and scripting. ``torch.fx`` (timm's ``features_only=True, feature_cls="fx"``, torchvision's
``create_feature_extractor``) and TorchScript cannot follow the matrix root (Python control flow on
shapes and values, autograd Functions, a dataclass of options). The heads therefore call two kinds of
module-level functions that both leave opaque: the input checks and :func:`covariance_root_pool`. Each
is registered with :func:`torch.fx.wrap` (a traced graph holds one node that calls it, so the checks
still run in a ``GraphModule``) and marked :func:`torch.jit.ignore` (a scripted module calls it in
Python). The root options reach it as their JSON text (:attr:`CovarianceHead.root_text`), one ``str``
constant that fx and TorchScript can carry. The reduction, dropout and classifier are plain modules
that fx and TorchScript see as usual. A scripted head runs, but ``torch.jit.save`` refuses it (a Python
call cannot be serialised); :func:`torch.export.export` and :func:`covpool.export_onnx` are the routes
to a deployable graph (docs/conventions.md).
"""

# No ``from __future__ import annotations``: TorchScript reads the annotations of the functions it calls.
import json
from collections.abc import Callable

import torch
from torch import Tensor, nn

from covpool.checks import check_float, check_positive_int, nonfinite_samples, reads_values
from covpool.functional.covariance import sqrt_covariance_pool
from covpool.linalg import RootOptions

_OPTIONS_BY_TEXT: dict[str, RootOptions] = {}
"""The root options of every head built in this process, by their JSON text (what the graphs carry)."""


def options_text(options: RootOptions) -> str:
    """The JSON text of ``options`` (its non-default fields), registered for :func:`covariance_root_pool`.

    Example:
        >>> options_text(RootOptions(method="ns", steps=5))
        '{"method": "ns", "steps": 5}'
    """
    text = json.dumps(options.to_dict(), sort_keys=True)
    _OPTIONS_BY_TEXT.setdefault(text, options)
    return text


def _options(text: str) -> RootOptions:
    options = _OPTIONS_BY_TEXT.get(text)
    if options is None:  # a head unpickled in another process
        options = _OPTIONS_BY_TEXT.setdefault(text, RootOptions.coerce(json.loads(text)))
    return options


@torch.jit.ignore
def covariance_root_pool(tokens: Tensor, root: str, eps: float) -> Tensor:
    """:func:`covpool.functional.sqrt_covariance_pool` with the options given as their JSON text.

    Opaque to ``torch.fx`` (one graph node) and a Python call under TorchScript (see the module docstring).

    Shape:
        - tokens: :math:`(N, M, d)`
        - output: :math:`(N, d (d + 1) / 2)`
    """
    return sqrt_covariance_pool(tokens, root=_options(root), eps=eps)


torch.fx.wrap("covariance_root_pool")


# torch >= 2.6 tells fx's symbolic tracing from torch.export (whose is_fx_tracing also says yes, and logs).
_is_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing
)


@torch.jit.ignore
def _fx_tracing() -> bool:
    return _is_fx_symbolic_tracing()


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

    Subclasses set ``POOL_TYPE`` (the name of their pooling in timm's ``global_pool`` / ``pool_type``),
    call :meth:`_build_reduction` and then :meth:`_build_classifier` in their constructor, and define
    ``_pooled_features(x)``: checked input to pooled features, written with what fx and TorchScript trace.
    """

    POOL_TYPE = "cov"
    __jit_ignored_attributes__ = ["_root", "_factory"]
    __jit_unused_properties__ = ["root"]

    def __init__(
        self,
        in_features: int,
        *,
        root: RootOptions | str | dict | None,
        eps: float,
        pool_type: str | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        self.root = root
        check_float(eps, f"{type(self).__name__}: eps")
        self._factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.eps = float(eps)
        self.pool_type = self._check_pool_type(self.POOL_TYPE if pool_type is None else pool_type)

    @property
    def root(self) -> RootOptions:
        """Options of the matrix square root (set from a :class:`covpool.RootOptions`, name or dict)."""
        return self._root

    @root.setter
    def root(self, value: RootOptions | str | dict | None) -> None:
        self._root = RootOptions.coerce(value)
        self.root_text = options_text(self._root)

    def _check_pool_type(self, pool_type: str) -> str:
        if pool_type not in (self.POOL_TYPE, ""):
            raise ValueError(
                f"{type(self).__name__}: pool_type must be None (in reset: keep the pooling), "
                f"{self.POOL_TYPE!r} (its second-order pooling) or '' (no pooling: the head returns its "
                f"input, timm's convention for an unpooled model), got {pool_type!r}"
            )
        return pool_type

    def _build_reduction(self, reduction_dim: int | None, build: Callable[[int], nn.Module]) -> int:
        """Set ``self.reduce`` to ``build(reduction_dim)`` (identity for ``None``); returns its width."""
        self.reduction_dim = reduction_dim
        if reduction_dim is None:
            self.reduce = nn.Identity()
            return self.in_features
        check_positive_int(reduction_dim, "reduction_dim")
        self.reduce = build(reduction_dim)
        return reduction_dim

    def _build_classifier(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = num_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: identity).

        ``pool_type``: ``None`` keeps the pooling, ``''`` removes it (with ``num_classes=0``: ``forward``
        then returns its input unchanged, timm's ``reset_classifier(0, '')``), ``POOL_TYPE`` restores it.
        """
        pool_type = self.pool_type if pool_type is None else self._check_pool_type(pool_type)
        fc = make_classifier(self.num_features, num_classes, self, self._factory)
        if pool_type == "" and num_classes != 0:
            raise ValueError(
                f"{type(self).__name__}: pool_type='' (no pooling) needs num_classes=0, got "
                f"num_classes={num_classes}: a classifier needs the pooled features (as in timm)"
            )
        self.pool_type, self.fc = pool_type, fc

    def _pooled_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _pool(self, tokens: Tensor) -> Tensor:
        """``triu(Σ^(1/2))`` of ``(N, M, d)`` tokens with this head's options."""
        return covariance_root_pool(tokens, self.root_text, self.eps)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.pool_type == "":
            return x
        if torch.jit.is_scripting() or _fx_tracing():
            features = self.drop(self._pooled_features(x))
        else:
            features = self.drop(self._guarded_features(x))
        return features if pre_logits else self.fc(features)

    @torch.jit.unused
    def _guarded_features(self, x: Tensor) -> Tensor:
        """:meth:`_pooled_features`, leaving every buffer as it was when the batch is rejected.

        Rejected: input that is not floating point (``TypeError``), or, where values are read
        (``root.check_input``, by default on CPU), input with NaN/Inf, a covariance the root refuses, or
        batch statistics of the reduction that are not finite (its BatchNorm overflowed); the
        ``ValueError`` names the head and the samples. Where values are not read (CUDA by default,
        ``torch.compile``), the same batches are detected on the device: the buffers keep their values and
        the features come out NaN, as covpool's roots answer a matrix they cannot take.
        """
        if not torch.is_floating_point(x):
            raise TypeError(
                f"{self._label()}: input must be a floating-point tensor (float16, bfloat16, float32 or "
                f"float64), got {x.dtype}"
            )
        reads = reads_values(self.root.check_input, x.device)
        if reads:
            bad = nonfinite_samples(x)
            if bad:
                raise ValueError(
                    f"{self._label()}: input holds NaN or Inf in samples {bad} of {x.shape[0]} (shape "
                    f"{tuple(x.shape)}); the batch was rejected and the head's buffers are unchanged"
                )
        buffers = [b for b in self.buffers() if b is not None] if self.training else []
        saved = [b.clone() for b in buffers]
        try:
            features = self._pooled_features(x)
        except ValueError as error:
            if not saved:
                raise
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
            raise ValueError(
                f"{self._label()}: the batch was rejected ({error}); the batch entries are samples, and the "
                "head's buffers are unchanged"
            ) from error
        if not saved:
            return features
        finite = torch.stack([torch.isfinite(b).all() for b in buffers if b.is_floating_point()]).all()
        if reads and not bool(finite):
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.data.copy_(value)
            raise ValueError(
                f"{self._label()}: the batch statistics of the reduction ({type(self.reduce).__name__}) are "
                f"not finite: the features overflowed in {x.dtype} (largest |x| = "
                f"{float(x.detach().abs().amax()):.3g}). The batch was rejected and the "
                "head's buffers are unchanged; rescale the features, or use reduction_dim=None (the "
                "covariance pooling itself is scale-safe)"
            )
        # Through .data: BatchNorm's backward holds its running statistics (it reads them only in eval
        # mode), so a write that autograd sees would fail that backward although nothing it uses changed.
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.data.copy_(torch.where(finite, buffer, value))
        return torch.where(finite, features, torch.full_like(features, float("nan")))

    def _label(self) -> str:
        reduction = "" if self.reduction_dim is None else f", reduction_dim={self.reduction_dim}"
        return f"{type(self).__name__}({self.in_features}{reduction})"
