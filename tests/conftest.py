"""Shared fixtures (kornia's manner): ``--device`` (cpu by default; cuda runs the same tests on a GPU),
``--dtype`` (the float dtypes the numerical tests run in), ``--matmul-precision`` (torch's float32 matmul
setting for the whole run), the session seed, and ``covpool_warnings`` (the warnings covpool's code gives
while a block runs, e.g. dynamo's about a call it traces)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
import torch._dynamo

import covpool
from covpool.linalg import precision

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for the numerical tests (cpu or cuda)")
    parser.addoption(
        "--dtype", default="float32,float64", help="comma-separated dtypes of the `dtype` fixture"
    )
    parser.addoption(
        "--matmul-precision",
        default=None,
        choices=("highest", "high", "medium"),
        help="torch.set_float32_matmul_precision for the whole run (TF32: high, bfloat16: medium), as a "
        "user may set it; the roots must not notice",
    )


def _parametrized_names(metafunc: pytest.Metafunc) -> set[str]:
    names: set[str] = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0]
        names.update(n.strip() for n in argnames.split(",")) if isinstance(argnames, str) else names.update(
            argnames
        )
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dtype" in metafunc.fixturenames and "dtype" not in _parametrized_names(metafunc):
        names = metafunc.config.getoption("--dtype").split(",")
        metafunc.parametrize("dtype", [DTYPES[name] for name in names], ids=names)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(scope="session", autouse=True)
def _session_matmul_precision(request: pytest.FixtureRequest) -> Iterator[None]:
    saved = precision._read()
    value = request.config.getoption("--matmul-precision")
    if value is not None:
        torch.set_float32_matmul_precision(value)
    yield
    precision._write(saved)


@pytest.fixture
def restore_matmul_precision() -> Iterator[None]:
    """Put torch's float32 matmul setting back as the session had it after a test that changes it."""
    saved = precision._read()
    yield
    precision._write(saved)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@contextlib.contextmanager
def _recorded_covpool_warnings() -> Iterator[list[str]]:
    package = str(Path(covpool.__file__).parent)
    recorded: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield recorded
    # dynamo warns from its own files and names the traced caller's file in the message.
    recorded.extend(
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if w.filename.startswith(package) or package in str(w.message)
    )


@pytest.fixture
def covpool_warnings(monkeypatch: pytest.MonkeyPatch) -> Callable[[], AbstractContextManager[list[str]]]:
    """``with covpool_warnings() as caught:`` fills ``caught`` on exit with the warnings raised in covpool's
    files or naming one of them. Dynamo's warn-once memory is emptied first, so that a warning an earlier
    test already gave is seen again."""
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    return _recorded_covpool_warnings


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
