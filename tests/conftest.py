"""Shared fixtures (kornia's manner): ``--device`` (cpu by default; cuda runs the same tests on a GPU),
``--dtype`` (the float dtypes the numerical tests run in), and the session seed."""

from __future__ import annotations

import pytest
import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for the numerical tests (cpu or cuda)")
    parser.addoption(
        "--dtype", default="float32,float64", help="comma-separated dtypes of the `dtype` fixture"
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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
