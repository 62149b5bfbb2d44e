"""Constructor docstrings: ``help(Layer.__init__)`` shows the layer's own arguments, not torch's text."""

from __future__ import annotations

import inspect

import pytest
from torch import nn

import covpool

PUBLIC_MODULES = [
    value
    for value in (getattr(covpool, name) for name in covpool.__all__)
    if isinstance(value, type) and issubclass(value, nn.Module)
]


def test_the_public_layers_are_found():
    assert {"CovPoolHead", "SecondOrderTokenHead", "ZCABatchNorm1d", "ZCABatchNorm2d"} <= {
        cls.__name__ for cls in PUBLIC_MODULES
    }


@pytest.mark.parametrize("cls", PUBLIC_MODULES, ids=lambda cls: cls.__name__)
def test_init_docstring_names_every_argument(cls):
    doc = cls.__init__.__doc__ or ""
    assert doc != nn.Module.__init__.__doc__ and "Args:" in doc
    assert doc.splitlines()[0] == inspect.cleandoc(cls.__doc__).splitlines()[0]
    parameters = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    args = doc[doc.index("Args:") :]
    assert all(f"{name}:" in args or f"{name}," in args for name in parameters), parameters


def test_an_inherited_constructor_keeps_its_signature_and_the_base_docstring():
    signature = inspect.signature(covpool.ZCABatchNorm1d.__init__)
    assert list(signature.parameters)[:3] == ["self", "num_features", "group_size"]
    base = covpool.ZCABatchNorm2d.__mro__[1]
    assert base.__init__.__doc__ is None or "Group ZCA" not in base.__init__.__doc__
    assert covpool.ZCABatchNorm1d(4, group_size=2).group_size == 2
