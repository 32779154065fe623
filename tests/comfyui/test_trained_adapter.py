"""An adapter trained by `multicond`'s diffusers trainer loads in ComfyUI's ControlNet loader and MaskedAdapter
applies it, for the 1-channel canny adapter the trainer makes (as the original's) and a 3-channel one given as
--init-adapter.

The training runs in a subprocess with the project's own environment (`.venv`, made by
scripts/env.sh), as a user would train before loading the file in ComfyUI. ComfyUI infers the input channels from
`conv_in`'s weight (comfy/controlnet.py, load_t2i_adapter) and feeds a 1-channel adapter the mean of the hint's RGB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .comfy_host import ROOT, find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy.controlnet  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402

from multicond.nodes.adapter import MaskedAdapter  # noqa: E402

from . import tiny  # noqa: E402

PROJECT_PYTHON = Path(os.environ.get("MULTICOND_PYTHON", ROOT / ".venv" / "bin" / "python"))

# A four-level diffusers UNet with the ComfyUI test model's widths (32, 64, 128, 128): ComfyUI's T2I-Adapter loader
# expects four feature levels, and the adapter must fit the tiny SD1.5-shaped model it is applied to here.
TRAIN = """
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from multicond.core.diffusers_binding.adapter_training import (AdapterTrainSettings, adapter_for_unet, save_adapter,
                                                               train_adapter)
from multicond.core.diffusers_binding.tiny import tiny_pipeline, tiny_sd1_four_level_unet

images, out = Path(sys.argv[1]), Path(sys.argv[2])
images.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for index in range(8):
    picture = np.zeros((64, 64, 3), np.uint8)
    top, left = rng.integers(4, 30, size=2)
    picture[top:top + 24, left:left + 24] = 255
    Image.fromarray(picture).save(images / f"{index}.png")
    (images / f"{index}.txt").write_text("a white square")
pipe = tiny_pipeline("sd1")
pipe.unet = tiny_sd1_four_level_unet()
save_adapter(adapter_for_unet(pipe.unet, "sd1", in_channels=3), out / "rgb-init")
for channels, init in ((1, None), (3, str(out / "rgb-init"))):  # the trainer's own 1-channel adapter; a 3-channel one
    result = train_adapter(AdapterTrainSettings(images=images, out=out / str(channels), steps=2, batch_size=2,
                                                grad_accumulation=1, warmup=1, checkpoint_every=100, size=64,
                                                device="cpu", init_adapter=init), pipe=pipe)
    print(channels, result.adapter_path)
"""


@pytest.fixture(scope="module")
def trained_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    if not PROJECT_PYTHON.is_file():
        pytest.skip(f"the project's environment ({PROJECT_PYTHON}) is missing: run `bash scripts/env.sh` (or set MULTICOND_PYTHON)")
    folder = tmp_path_factory.mktemp("adapter")
    done = subprocess.run([str(PROJECT_PYTHON), "-c", TRAIN, str(folder / "images"), str(folder / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    paths = {int(channels): Path(path) for channels, path in
             (line.split(" ", 1) for line in done.stdout.strip().splitlines()[-2:])}
    assert sorted(paths) == [1, 3] and all(path.is_file() for path in paths.values())
    return paths


@pytest.mark.parametrize("channels", [1, 3])
def test_the_trained_adapter_loads_as_a_t2i_adapter_and_masked_adapter_applies_it(trained_adapters: dict[int, Path],
                                                                                   channels: int):
    import safetensors.torch

    path = trained_adapters[channels]
    with torch.inference_mode():
        control = comfy.controlnet.load_controlnet(str(path))
    assert isinstance(control, comfy.controlnet.T2IAdapter)
    assert control.channels_in == channels == control.t2i_model.input_channels   # inferred from conv_in's weight
    saved = safetensors.torch.load_file(str(path))
    assert saved["adapter.conv_in.weight"].shape[1] == channels * 8 ** 2
    assert torch.equal(control.t2i_model.conv_in.weight.float(), saved["adapter.conv_in.weight"].float())

    # A Canny edge map as a ComfyUI IMAGE: white edges, the same in R, G and B.
    edges = (torch.rand(1, 128, 128, generator=torch.Generator().manual_seed(0)) > 0.8).float()
    hint = edges[..., None].repeat(1, 1, 1, 3)
    with torch.inference_mode():  # what ComfyUI feeds the adapter: the mean over RGB for 1 channel, the image for 3
        fed = control.copy().set_cond_hint(hint.movedim(-1, 1))
        fed.get_control(torch.zeros(1, 4, 16, 16), torch.tensor([999.0]), None, 1, {})
        assert fed.cond_hint.shape == (1, channels, 128, 128)
        assert torch.equal(fed.cond_hint, edges[:, None].repeat(1, channels, 1, 1))

    model = tiny.build("sd15_shaped")
    base = tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2)
    positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(*base, control, hint, 1.0, 0.0, 1.0)
    run = lambda p, n: tiny.sample(model, "sd15_shaped", positive=p, negative=n, latent=torch.zeros(1, 4, 16, 16))  # noqa: E731
    controlled, plain = run(positive, negative), run(*base)
    assert (controlled - plain).abs().max() > 1e-4, "the trained adapter's features reach the UNet"
    assert torch.equal(run(*MaskedAdapter.execute(positive, negative, torch.ones(128, 128), "nearest", 0.0, "").args), controlled)
    assert torch.equal(run(*MaskedAdapter.execute(positive, negative, torch.zeros(128, 128), "nearest", 0.0, "").args), plain)
