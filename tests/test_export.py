"""Deployment: ``torch.export`` of the layers and models in eval mode, ONNX export and ONNX Runtime inference.

Exported graphs are checked against eager PyTorch at a batch size other than the example's (dynamic batch),
by relative Frobenius error.
"""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
import torchvision
from torch import nn

import covpool
from covpool import CovPoolHead, SecondOrderTokenHead, ZCABatchNorm2d, convert_zca_batchnorm
from covpool.export import export_onnx, onnx_blockers
from covpool.linalg import precision
from covpool.testing import random_spd

TOLERANCE = 1e-4  # exported graph against eager PyTorch with the same root method, relative
AUTO_TOLERANCE = 1e-3  # method "auto": eigh in eager on CPU, a matmul method when traced; auto's default tol


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approx - exact‖ / ‖exact‖`` over all entries, in float64."""
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def _dynamic_batch() -> tuple[dict[int, torch.export.Dim]]:
    """``dynamic_shapes`` of ``torch.export.export`` for one input whose dimension 0 is free."""
    return ({0: torch.export.Dim("batch", min=1)},)


def _trained_zca(method: str) -> ZCABatchNorm2d:
    """ZCA layer in eval whose running statistics are a random SPD covariance and a nonzero mean."""
    layer = ZCABatchNorm2d(8, group_size=4, root=method)
    with torch.no_grad():
        layer.running_cov.copy_(random_spd(2, n=4, condition=10.0, dtype=torch.float32))
        layer.running_mean.uniform_(-1.0, 1.0)
        layer.weight.uniform_(0.5, 2.0)
    return layer.eval()


EXPORT_CASES = {  # name: (model in eval, input shape without the batch, tolerance)
    "CovPoolHead-mtp": (
        lambda: CovPoolHead(32, 10, reduction_dim=8, root="mtp").eval(),
        (32, 7, 7),
        TOLERANCE,
    ),
    "SecondOrderTokenHead-mpa": (
        lambda: SecondOrderTokenHead(32, 10, reduction_dim=8, root="mpa").eval(),
        (1 + 49, 32),
        TOLERANCE,
    ),
    "ZCABatchNorm2d-auto": (lambda: _trained_zca("auto"), (8, 5, 5), AUTO_TOLERANCE),
    "ZCABatchNorm2d-eigh": (lambda: _trained_zca("eigh"), (8, 5, 5), TOLERANCE),
    "resnet18_isqrtcov": (
        lambda: timm.create_model("resnet18_isqrtcov", num_classes=10, reduction_dim=8).eval(),
        (3, 64, 64),
        AUTO_TOLERANCE,
    ),
}


OLD_DYNAMO = pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < "2.11",
    reason="dynamo before torch 2.11 cannot pass the root options to the host-side planner (seen with 2.4)",
)


@OLD_DYNAMO
class TestTorchExport:
    @pytest.mark.parametrize("case", list(EXPORT_CASES))
    def test_eval_export_with_dynamic_batch(self, case: str) -> None:
        build, shape, tolerance = EXPORT_CASES[case]
        model = build()
        program = torch.export.export(model, (torch.randn(2, *shape),), dynamic_shapes=_dynamic_batch())
        x = torch.randn(3, *shape)
        with torch.no_grad():
            assert _relative_error(program.module()(x), model(x)) <= tolerance

    def test_zca_graph_follows_running_cov(self) -> None:
        layer = ZCABatchNorm2d(8, group_size=4, eps=0.0, root={"method": "mtp", "tol": 1e-6}).eval()
        x = torch.randn(2, 8, 5, 5)
        exported = torch.export.export(layer, (x,)).module()
        assert layer._eval_cache is None  # tracing neither reads nor fills the eager cache
        with torch.no_grad():
            exported.running_cov.mul_(4.0)  # zero mean: whitening by (4 I)^(-1/2) halves the input
        assert _relative_error(exported(x), x / 2.0) <= TOLERANCE


class TestOnnxRefusals:
    def test_names_the_layers_that_cannot_export(self, tmp_path) -> None:
        model = convert_zca_batchnorm(
            torchvision.models.resnet18(num_classes=10), layers="first", group_size=16, root="mpa"
        )
        model.fc = CovPoolHead(512, 10, reduction_dim=8, root="eigh", input_format="NLC")
        assert onnx_blockers(model) == [
            "layer 'bn1' (ZCABatchNorm2d) has method='mpa': ONNX has no Cholesky operator "
            "(the Padé step solves with one)",
            "layer 'fc' (CovPoolHead) has method='eigh': ONNX has no eigendecomposition operator",
        ]
        with pytest.raises(ValueError, match=r"(?s)'bn1'.*'fc'.*method='mtp'") as raised:
            export_onnx(model.eval(), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")
        assert "root='mtp'" in str(raised.value)
        assert not (tmp_path / "m.onnx").exists()

    def test_matmul_methods_pass(self) -> None:
        for method in ("auto", "mtp", "ns"):
            model = nn.Sequential(
                ZCABatchNorm2d(8, group_size=4, root=method),
                CovPoolHead(8, 2, reduction_dim=4, root=method),
            )
            assert onnx_blockers(model) == []

    def test_training_mode_and_batch_of_one(self, tmp_path) -> None:
        head = CovPoolHead(8, 2, reduction_dim=4, root="mtp")
        with pytest.raises(ValueError, match=r"model\.eval\(\)"):
            export_onnx(head, torch.randn(2, 8, 3, 3), tmp_path / "m.onnx")
        with pytest.raises(ValueError, match=r"at least 2.*\[\(1, 8, 3, 3\)\]"):
            export_onnx(head.eval(), torch.randn(1, 8, 3, 3), tmp_path / "m.onnx")
        with pytest.raises(TypeError, match="example"):
            export_onnx(head, [], tmp_path / "m.onnx")

    def test_missing_extra(self, tmp_path, monkeypatch) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a)
        )
        head = CovPoolHead(8, 2, reduction_dim=4, root="mtp").eval()
        with pytest.raises(ModuleNotFoundError, match=r"onnxscript.*covpool\[export\]"):
            export_onnx(head, torch.randn(2, 8, 3, 3), tmp_path / "m.onnx")


def _zca_torchvision() -> nn.Module:
    """torchvision ResNet-18 whose first BatchNorm is a ZCA layer with the default method ("auto").

    Its running covariances have condition number 10, where every root method agrees with the exact
    root to float32 precision, so the comparison with eager (eigh there) is about the export.
    """
    model = convert_zca_batchnorm(torchvision.models.resnet18(num_classes=10), layers="first", group_size=16)
    with torch.no_grad():
        model.bn1.running_cov.copy_(random_spd(4, n=16, condition=10.0, dtype=torch.float32))
    return model.eval()


ONNX_CASES = {  # name: (model in eval, input shape without the batch)
    "resnet18_isqrtcov-mtp": (
        lambda: timm.create_model("resnet18_isqrtcov", num_classes=10, reduction_dim=8, root="mtp").eval(),
        (3, 64, 64),
    ),
    "vit_small_patch16_224_sovit-mtp": (
        lambda: timm.create_model(
            "vit_small_patch16_224_sovit",
            num_classes=10,
            img_size=64,
            depth=1,
            reduction_dim=8,
            root="mtp",
        ).eval(),
        (3, 64, 64),
    ),
    "torchvision-resnet18-zca-auto": (_zca_torchvision, (3, 64, 64)),
}


@OLD_DYNAMO
class TestOnnx:
    @pytest.mark.parametrize("setting", ["high", "medium"])
    def test_exports_products_whatever_the_global_matmul_setting(
        self, setting: str, tmp_path, restore_matmul_precision
    ) -> None:
        """With TF32/bfloat16 set globally a traced root would become ``covpool::root``, which ONNX cannot
        express; the export traces at "highest" and gives the user's setting back."""
        onnx = pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        torch.set_float32_matmul_precision(setting)
        before = precision.current_precision()
        head = CovPoolHead(8, 2, reduction_dim=4, root="mtp").eval()
        path = covpool.export_onnx(head, torch.randn(2, 8, 3, 3), tmp_path / "head.onnx")
        assert precision.current_precision() == before != "highest"
        assert {node.domain for node in onnx.load(path).graph.node} <= {""}  # standard operators only
        x = torch.randn(3, 8, 3, 3)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = head(x)
        assert _relative_error(torch.from_numpy(logits), expected) <= TOLERANCE

    @pytest.mark.parametrize("case", list(ONNX_CASES))
    def test_onnxruntime_matches_eager(self, case: str, tmp_path) -> None:
        onnx = pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        build, shape = ONNX_CASES[case]
        model = build()
        path = covpool.export_onnx(model, torch.randn(2, *shape), tmp_path / "model.onnx")
        assert {o.version for o in onnx.load(path).opset_import if o.domain == ""} == {18}
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (graph_input,) = session.get_inputs()
        assert graph_input.shape[0] == "batch"
        for batch in (1, 5):
            x = torch.randn(batch, *shape)
            (logits,) = session.run(None, {graph_input.name: x.numpy()})
            with torch.no_grad():
                expected = model(x)
            assert _relative_error(torch.from_numpy(logits), expected) <= TOLERANCE
