"""Make the pack importable as `multicond` whatever its folder is called; the shared float tolerance rule."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import numpy as np
    import torch
except ModuleNotFoundError as error:  # a ComfyUI host's Python without its requirements, say
    pytest.exit(f"the Python running the tests ({sys.executable}) lacks the package {error.name!r}: use the project "
                f"venv (scripts/test.sh makes it) or, for the ComfyUI tier, a host venv (scripts/host_venv.sh)",
                returncode=4)

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
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_close_scaled(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, *, rel: float = 1e-5,
                        amplification: float = 1.0, msg: str | None = None) -> None:
    """`actual` is `expected` up to the float32 rounding of the same math summed in another order.

    Another batch size, thread count or CPU kernel (BLAS/oneDNN code paths, AVX2 vs AVX512) moves a
    float32 result by ulps of the magnitudes it sums, not of each element (an element near zero
    carries its large neighbours' rounding), so the tolerance is absolute and scaled to the reference:
    atol = rel * amplification * max|expected|, rtol = 0.

    rel: 1e-5 for the same math in another order; 1e-4 for another formulation of it (explicit
    logits vs a fused attention kernel) or for a gradient (backward sums cancel more).
    amplification: what multiplies the difference after it arises and the reference's magnitude does
    not already show: a CFG guidance scale (it scales the difference of two near-equal predictions),
    times the sampling steps it accumulates over. Results that must be bit-identical (a reference row
    kept, the very same kernel call on the same shapes) take torch.equal instead.
    """
    actual, expected = (torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x for x in (actual, expected))
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * amplification * scale, msg=msg)
