"""The command line itself: complete and quick --help, the caller's relative paths, one-line input errors."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from multicond.core.diffusers_binding import cli, cli_adapter, pipeline

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("style-aligned", "dual-style", "spatial", "analyze", "train-adapter", "score-local")
HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL")
SD1_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SDXL_KEY = "conditioner.embedders.1.model.positional_embedding"
SD2_KEY = "cond_stage_model.model.token_embedding.weight"

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def help_entries(text: str) -> dict[str, str]:
    """Each flag's entry in a help text (its line and the indented lines under it), by each of its option strings."""
    blocks: dict[str, list[str]] = {}
    block: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  -"):
            block = [line.strip()]
            head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]  # "--a A, --b" before the help text
            for option in head.split(", "):
                blocks[option.split()[0]] = block
        elif block is not None and line.startswith("   "):
            block.append(line.strip())
        else:
            block = None
    return {option: " ".join(lines) for option, lines in blocks.items()}


@pytest.fixture(scope="module")
def checkout_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PYTHONPATH folder holding only `multicond` -> this checkout (the repository folder may have any name)."""
    folder = tmp_path_factory.mktemp("path")
    (folder / "multicond").symlink_to(ROOT, target_is_directory=True)
    return folder


def last_error_line(err: str) -> str:
    """The `error:` line of an argparse usage error, checking it is the only one and no traceback came with it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and sum("error:" in line for line in lines) == 1, err
    return lines[-1]


# ---------------------------------------------------------------- --help

@pytest.mark.parametrize("command", COMMANDS)
def test_help_gives_every_flag_its_meaning_and_default(command: str) -> None:
    parser = subparsers(cli.build_parser("prog"))[command]
    text = parser.format_help()
    entries = help_entries(text)
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help and len(action.help) > 8, f"{command} {flag} has no meaning"
        entry = entries[flag]
        assert ("(required)" if action.required else "default") in entry.lower(), f"{command} {flag}: {entry!r}"
        assert "default: None" not in entry, f"{command} {flag}: {entry!r}"


def test_help_entries_split_the_real_help() -> None:
    """The parser of the help test: `--device` of style-aligned has its own entry and default."""
    entries = help_entries(subparsers(cli.build_parser("prog"))["style-aligned"].format_help())
    assert entries["--device"].startswith("--device DEVICE") and "(default: auto)" in entries["--device"]
    assert "(default: True)" in entries["--share-group-norm"] and "(default: True)" in entries["--no-share-group-norm"]
    assert "--cfg" not in entries["--device"]


def test_usage_names_the_command_the_user_typed(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(cli.PROG_VARIABLE, raising=False)
    assert cli.build_parser().format_usage().startswith("usage: python -m multicond ")
    monkeypatch.setenv(cli.PROG_VARIABLE, "scripts/run.sh")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["style-aligned", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: scripts/run.sh style-aligned [options]")


def test_help_answers_without_importing_torch_or_diffusers(checkout_path: Path) -> None:
    """`python -m multicond ... --help` imports neither torch nor diffusers (they take seconds), nor transformers."""
    probe = ("import runpy, sys\n"
             "for argv in (['--help'], *([c, '--help'] for c in sys.argv[1:])):\n"
             "    sys.argv = ['multicond', *argv]\n"
             "    try:\n"
             "        runpy.run_module('multicond', run_name='__main__')\n"
             "    except SystemExit as exit:\n"
             "        assert exit.code == 0, exit.code\n"
             f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(checkout_path)}
    run = subprocess.run([sys.executable, "-c", probe, *COMMANDS], cwd=checkout_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert all(f" {command} " in run.stdout for command in COMMANDS)
    assert "torchvision" not in run.stderr and run.stderr == ""


def test_help_facts_match_the_library() -> None:
    """The values --help shows without importing the library are the library's."""
    from multicond.core import adapter, blend, inversion, spatial, style
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from multicond.core.diffusers_binding import adapter_training, joint_style_flux, tiny

    assert cli.FAMILIES == tiny.FAMILIES and cli.TINY_IMAGE_SIZE == tiny.TINY_IMAGE_SIZE
    assert (cli.DIT_FAMILIES, cli.TINY_T5_TOKENS) == (tiny.DIT_FAMILIES, tiny.TINY_T5_TOKENS)
    assert cli.FLUX_SCORE_SCALE == joint_style_flux.ALIGNEDGEN_SCORE_SCALE
    for family, pipeline in (("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):  # the pipelines' defaults
        defaults = inspect.signature(pipeline.__call__).parameters
        assert cli.DEFAULT_STEPS[family] == defaults["num_inference_steps"].default
        assert cli.DEFAULT_CFG[family] == defaults["guidance_scale"].default
    assert (cli.INVERSION_GUIDANCE, cli.PIN_OFFSET) == (inversion.INVERSION_GUIDANCE, inversion.PIN_OFFSET)
    assert cli.STYLE_ALIGNED_DEFAULTS == dataclasses.asdict(style.StyleAlignedArgs())
    switches = [f.name for f in dataclasses.fields(style.StyleAlignedArgs) if f.type in (bool, "bool")]
    assert list(cli.STYLE_ALIGNED_SWITCHES) == switches
    assert cli.SHAPES == blend.SHAPES and cli.DIRECTIONS == tuple(blend.DIRECTIONS)
    assert (cli.EPSILON_SHARPNESS, cli.CROSS_ATTENTION_SHARPNESS) == (blend.EPSILON_SHARPNESS,
                                                                      blend.CROSS_ATTENTION_SHARPNESS)
    assert cli.RELATIONS == spatial.RELATIONS and cli.PHI_NAMES == tuple(spatial.PHI)
    assert cli.SPATIAL_DEFAULTS == dataclasses.asdict(spatial.SpatialSettings())
    train = adapter_training.AdapterTrainSettings(images=Path("."), out=Path("."))
    assert cli_adapter.TRAIN_DEFAULTS == {name: getattr(train, name) for name in cli_adapter.TRAIN_DEFAULTS}
    assert (cli_adapter.EDGE_METHODS, cli_adapter.CONDITION_NAMES, cli_adapter.SOFT_MASKS, cli_adapter.METRIC_SIGMA) \
        == (adapter.EDGE_METHODS, adapter.CONDITION_NAMES, adapter.SOFT_MASKS, adapter.METRIC_SIGMA)


def test_flags_give_the_library_defaults() -> None:
    from multicond.core.spatial import SpatialSettings
    from multicond.core.style import StyleAlignedArgs

    parser = cli.build_parser("prog")
    assert cli.style_aligned_args(parser.parse_args(["style-aligned"])) == StyleAlignedArgs()
    flux = cli.style_aligned_args(parser.parse_args(["style-aligned", "--family", "flux"]))
    assert flux == StyleAlignedArgs(shared_score_scale=cli.FLUX_SCORE_SCALE)  # AlignedGen's lambda on Flux
    ns = parser.parse_args(["spatial", "--relation", "left of"])
    assert cli.spatial_settings(ns) == SpatialSettings()


# ---------------------------------------------------------------- relative paths and the style

def venv_is_current() -> bool:
    """scripts/env.sh would reinstall (pip, network) unless the venv was built for this pyproject.toml."""
    stamp = Path(sys.prefix, ".multicond-pyproject")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return stamp.is_file() and stamp.read_text().strip() == want


@pytest.mark.skipif(not venv_is_current(), reason="the venv predates pyproject.toml: run scripts/run.sh once")
def test_run_sh_takes_paths_from_the_callers_directory(tmp_path: Path, checkout_path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "myref.png")
    script = ROOT / "scripts" / "run.sh"
    env = {**os.environ, "MULTICOND_VENV": sys.prefix, "PYTHONPATH": str(checkout_path)}  # this checkout's code
    env.pop(cli.PROG_VARIABLE, None)
    flags = ["--prompts", "a dog", "--steps", "2", "--pin-offset", "1", "--reference-image", "myref.png",
             "--reference-prompt", "a red square", "--out", "myout"]
    run = subprocess.run(["bash", str(script), "style-aligned", *flags], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = [Path(line) for line in run.stdout.splitlines() if line.endswith(".png")]
    assert [p.as_posix() for p in printed] == ["myout/00-reference-a-red-square.png",
                                               "myout/01-a-dog-macro-photo-3d-game-asset.png"]
    assert all((tmp_path / p).is_file() for p in printed)  # the printed paths exist from where the user stands
    assert not (ROOT / "myout").exists()
    assert "torchvision" not in run.stderr

    missing = subprocess.run(["bash", str(script), "style-aligned", "--reference-image", "nope.png",
                              "--reference-prompt", "x"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"usage: {script} style-aligned [options]")
    assert last_error_line(missing.stderr).endswith(f"error: --reference-image nope.png: no such file (in {tmp_path})")


def test_default_output_folder_is_outputs_in_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["style-aligned", "--prompts", "a cat", "a dog", "--steps", "2", "--style", ""]) == 0
    out = capsys.readouterr().out
    assert "style: none (--style '')" in out
    files = sorted((tmp_path / "outputs" / "style-aligned").glob("*.png"))
    assert [f.name for f in files] == ["00-reference-a-cat.png", "01-a-dog.png"]  # no style appended
    assert f"outputs/style-aligned/{files[0].name}" in out.splitlines()


def test_the_appended_style_is_announced() -> None:
    assert cli.style_line(cli.PAPER_STYLE) == ("style: 'macro photo. 3d game asset' appended to every prompt "
                                               "(--style '' for none)")
    assert cli.styled("a cat", "") == "a cat" and cli.styled("a cat", "oil") == "a cat, oil"


# ---------------------------------------------------------------- one-line input errors

def fake_checkpoint(path: Path, *keys: str) -> Path:
    """A .safetensors file with the given original-layout keys (tiny tensors): enough to be recognised."""
    save_file({key: torch.zeros(1, 4, 1, 1) for key in keys}, path)
    return path


@pytest.mark.parametrize("make, flags, message", [
    (lambda d: None, ["--checkpoint", "nope.safetensors"], "--checkpoint nope.safetensors: no such file or folder"),
    (lambda d: (d / "bad.safetensors").write_text("not a checkpoint"), ["--checkpoint", "bad.safetensors"],
     "--checkpoint bad.safetensors: cannot read it as a checkpoint (SafetensorError"),
    (lambda d: (d / "bad.ckpt").write_bytes(b"\x80\x04junk"), ["--checkpoint", "bad.ckpt"],
     "--checkpoint bad.ckpt: cannot read it as a checkpoint"),
    (lambda d: fake_checkpoint(d / "xl.safetensors", SDXL_KEY), ["--checkpoint", "xl.safetensors"],
     "--family sd1, but xl.safetensors holds an SDXL model. Add --family sdxl"),
    (lambda d: fake_checkpoint(d / "v2.safetensors", SD2_KEY), ["--checkpoint", "v2.safetensors"],
     "--checkpoint v2.safetensors: not an SD1.x or SDXL base checkpoint (its keys say: SD2)"),
    (lambda d: fake_checkpoint(d / "v1.safetensors", SD1_KEY), ["--checkpoint", "v1.safetensors"],
     "--tokenizer not given, and no CLIP tokenizer found offline for v1.safetensors. Pass --tokenizer DIR"),
    (lambda d: (fake_checkpoint(d / "v1.safetensors", SD1_KEY), (d / "tok").mkdir()),
     ["--checkpoint", "v1.safetensors", "--tokenizer", "tok"], "--tokenizer tok: no vocab.json and merges.txt in it"),
    (lambda d: (d / "model").mkdir(), ["--checkpoint", "model"],
     "--checkpoint model: not a diffusers model folder (FileNotFoundError"),
    (lambda d: None, ["--reference-image", "nope.png", "--reference-prompt", "x"],
     "--reference-image nope.png: no such file"),
    (lambda d: (d / "ref.png").write_text("text"), ["--reference-image", "ref.png", "--reference-prompt", "x"],
     "--reference-image ref.png: cannot read it as an image"),
])
def test_a_missing_or_unreadable_input_is_a_one_line_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture, make, flags: list[str],
                                                                 message: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "cached_tokenizer", lambda: None)  # whatever this machine's cache holds
    make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["style-aligned", "--steps", "6", "--out", "out", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    assert message in last_error_line(err)
    assert not (tmp_path / "out").exists()


def test_train_adapter_checks_its_model_flags_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-adapter", "--images", "images", "--checkpoint", "nope.safetensors"])
    assert exit_info.value.code == 2
    assert "--checkpoint nope.safetensors: no such file or folder" in last_error_line(capsys.readouterr().err)


def test_only_the_torchvision_notice_is_dropped() -> None:
    cli.quiet_torchvision_notice()
    cli.quiet_torchvision_notice()  # installing twice keeps one filter
    logger = logging.getLogger("transformers.utils.import_utils")
    assert sum(isinstance(f, cli._DropTorchvisionNotice) for f in logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to PIL")
        logger.warning("something else went wrong")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else went wrong"]
