"""Make the pack importable as `multicond` whatever its folder is called."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
