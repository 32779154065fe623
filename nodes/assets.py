"""What the example workflows need on the user's disk, put there when the pack loads in a ComfyUI server.

* The input images they load: the pack ships them in `example_inputs/` (drawn by scripts/make_example_inputs.py)
  and copies the missing ones into ComfyUI's input folder. They go to its top level, under a `multicond_` prefix:
  LoadImage lists only that level, and the frontend reports a workflow's image that is not in the list as missing.
  A file already there is never overwritten (the user may have replaced it).
* `models/multicond_gradings/`, where Layer Balance looks for grading files, created if absent, with a log line
  that says where the published gradings come from.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import folder_paths

from .balance import GRADINGS

EXAMPLE_INPUTS = Path(__file__).resolve().parent.parent / "example_inputs"
INPUT_PREFIX = "multicond_"  # every shipped input's name starts with it: the user's input folder is shared
GRADINGS_SOURCE = "https://github.com/Nadavc220/conditional-balance (folder grading_files/)"
SD35_GRADINGS_SOURCE = "https://github.com/Nadavc220/conditional-balance-sd35 (folder grading_files/)"


def missing_files(source: Path, target: Path) -> list[Path]:
    """The files of `source` that `target` has no file of the same name for."""
    if not source.is_dir():
        return []
    return sorted(path for path in source.iterdir() if path.is_file() and not (target / path.name).exists())


def copy_missing_files(source: Path, target: Path) -> list[str]:
    """Copy the files `target` lacks from `source`; the names copied."""
    missing = missing_files(source, target)
    if missing:
        target.mkdir(parents=True, exist_ok=True)
    for path in missing:
        shutil.copyfile(path, target / path.name)
    return [path.name for path in missing]


def has_grading(folder: Path) -> bool:
    """Any file but a hidden one (the published gradings have no suffix)."""
    return folder.is_dir() and any(path.is_file() and not path.name.startswith(".") for path in folder.iterdir())


def ensure_gradings_folder(folder: Path) -> str | None:
    """Create the gradings folder if absent; a message for the log when it holds no grading yet."""
    created = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if has_grading(folder):
        return None
    state = "created" if created else "no grading file in"
    return (f"MultiCond: {state} {folder}: Layer Balance (the Conditional Balance workflows) reads grading files "
            f"from it; download style_layer_grading (SDXL) from {GRADINGS_SOURCE} or gradingSd35L (SD3.5-Large) "
            f"from {SD35_GRADINGS_SOURCE} into it")


def inside_comfyui_server() -> bool:
    """A ComfyUI server is running in this process (not a script or a test that imports the nodes)."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None) is not None


def prepare_user_folders() -> None:
    """Copy the example inputs and create the gradings folder; only inside a running ComfyUI server."""
    if not inside_comfyui_server():  # importing the nodes elsewhere must not write into a ComfyUI tree
        return
    try:
        inputs = Path(folder_paths.get_input_directory())
        copied = copy_missing_files(EXAMPLE_INPUTS, inputs)
        if copied:
            logging.info("MultiCond: copied the example workflows' input images to %s: %s", inputs, ", ".join(copied))
        message = ensure_gradings_folder(Path(folder_paths.get_folder_paths(GRADINGS)[0]))
        if message:
            logging.info(message)
    except OSError as error:  # a read-only install still loads its nodes
        logging.warning("MultiCond: could not prepare the example workflows' files: %s", error)
