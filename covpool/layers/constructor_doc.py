"""Constructor docstrings from the class docstring, so that ``help(Layer.__init__)`` shows the arguments.

``help(covpool.CovPoolHead.__init__)`` would otherwise print :class:`torch.nn.Module`'s generic
"Initialize internal Module state" (the constructor inherits nothing better). The arguments are
documented once, in the class docstring's ``Args:`` section (kornia's and timm's place for them, which
Sphinx and ``help(Layer)`` show); :func:`document_init` copies that section under the class's summary
line into ``__init__.__doc__``, so there is one text to keep up to date.
"""

from __future__ import annotations

import functools
import inspect
from typing import TypeVar

Class = TypeVar("Class", bound=type)


def args_section(doc: str) -> str:
    """The ``Args:`` section of a Google-style docstring (heading included), or ``""`` without one.

    Example:
        >>> print(args_section('''Summary.
        ...
        ...     Args:
        ...         x: the input.
        ...             More on x.
        ...
        ...     Shape:
        ...         - input: (N,)
        ...     '''))
        Args:
            x: the input.
                More on x.
    """
    lines = inspect.cleandoc(doc).splitlines()
    if "Args:" not in lines:
        return ""
    start = lines.index("Args:")
    end = start + 1
    while end < len(lines) and (not lines[end] or lines[end].startswith(" ")):
        end += 1
    return "\n".join(lines[start:end]).rstrip()


def document_init(cls: Class | None = None, *, args_from: type | None = None):
    """Class decorator: ``cls.__init__.__doc__`` = the summary line of ``cls``'s docstring, then the
    ``Args:`` section of ``args_from``'s (default ``cls``'s).

    A class that inherits its constructor gets a forwarding ``__init__`` of its own (with the inherited
    signature, through ``functools.wraps``), so that the base's docstring is left alone.
    """

    def decorate(cls: Class) -> Class:
        args = args_section((args_from or cls).__doc__ or "")
        if not args:
            raise ValueError(f"{(args_from or cls).__name__}'s docstring has no Args: section")
        summary = inspect.cleandoc(cls.__doc__ or "").splitlines()[0]
        if "__init__" not in cls.__dict__:
            inherited = cls.__init__

            @functools.wraps(inherited)
            def __init__(self, *args, **kwargs) -> None:
                inherited(self, *args, **kwargs)

            __init__.__qualname__ = f"{cls.__qualname__}.__init__"
            cls.__init__ = __init__
        cls.__init__.__doc__ = f"{summary}\n\n{args}\n"
        return cls

    return decorate if cls is None else decorate(cls)
