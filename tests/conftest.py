"""Make the pack importable as `multicond` whatever its folder is called."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_pack() -> None:
    if "multicond" in sys.modules:
        return
    try:
        import multicond  # noqa: F401 - an installed copy (pip install -e .)
        if Path(multicond.__file__).resolve().parent == ROOT:
            return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("multicond", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["multicond"] = module
    spec.loader.exec_module(module)


_import_pack()


@pytest.fixture(scope="module")
def one_cpu_thread() -> Iterator[None]:
    """The tiny models' ops are so small that extra threads only add synchronisation cost."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
