"""The shipped workflows, run by a real headless ComfyUI server on tiny random models.

One server (a subprocess on 127.0.0.1, CPU) is started for the module, with a throwaway base
directory whose `custom_nodes/` holds this pack and the test-only `tiny_pack`. Each UI-format
workflow of `example_workflows/` is converted to the API format (`workflow_api.py`, using the server's
`/object_info`), its checkpoint loader is swapped for the tiny one, sizes and step counts are
shrunk, and the graph is queued through `POST /prompt` and followed through `/history`. Its images
are the ones it ships with: the pack copies them into the server's input folder when it loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from .comfy_host import ROOT, find_comfyui
from .workflow_api import FRONTEND_ONLY_NODES, check_links, check_widget_values, ui_to_api

COMFYUI = find_comfyui()
if COMFYUI is None:
    pytest.skip("no ComfyUI found (set COMFYUI_PATH): the workflow server test needs one", allow_module_level=True)

HOST = "127.0.0.1"
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
EXAMPLE_INPUTS = ROOT / "example_inputs"
MULTICOND_NODES = ("MultiCond_SharedAttention", "MultiCond_AdaINStyle", "MultiCond_StyleReference", "MultiCond_BatchPrompts",
                   "MultiCond_LayerBalance", "MultiCond_EpsilonBlend", "MultiCond_CrossAttnBlend", "MultiCond_SpatialGuidance",
                   "MultiCond_MaskedAdapter")
TINY_LOADER = "MultiCondTest_TinyCheckpoint"
TINY_FLUX_DEV = "flux1_dev"  # tiny_pack's Flux.1-dev-like DiT (the weights of core/diffusers_binding/tiny_dit.py)
# The tiny DiTs' joint-attention maps do depend on the latent: Spatial Guidance keeps the workflow's weight there (at
# 1000 it moves the 2-step latent by ~0.07 on the SD3.5-like, ~0.4 on the Flux-like; 100000 blows the latent up).
TINY_DITS = ("sd35l", TINY_FLUX_DEV)
FILE_INPUTS = frozenset({"ckpt_name", "image", "grading", "control_net_name"})  # choices are files on the user's disk
TINY_GRADING = "multicond_test_grading.json"
TINY_SD35_GRADING = "multicond_test_gradingSd35"  # CB35's format (torch.save), for the tiny SD3.5's 2 joint layers
TINY_SD35_LAMBDA_S = 0.5  # 1 of its 2 joint layers (the workflows' 28 is a count of SD3.5 Large's 38)
# int(1000·σ) of the 28-step shift-3 schedule: the keys of CB35's gradingSd35L (as tests/comfyui/test_dit_balance.py)
CB35_KEYS = (1000, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737, 707, 675, 640, 602, 560,
             515, 464, 409, 347, 278, 199, 110, 8)
LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")
SIZE = 64  # pixels: an 8x8 latent
STEPS = 2
INVERSION_STEPS, INVERSION_OFFSET = 3, 1
START_TIMEOUT_S = 120.0
PROMPT_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 30.0

# Never send this traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Server:
    url: str
    base: Path
    log: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


def http_json(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def link_or_copy(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source, target_is_directory=True)
    except OSError:  # no symlinks (Windows without developer mode)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "tests"))


def prepare_base(base: Path) -> None:
    for folder in ("custom_nodes", "input", "output", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    link_or_copy(ROOT, base / "custom_nodes" / "multicond")
    link_or_copy(Path(__file__).parent / "tiny_pack", base / "custom_nodes" / "multicond_tiny_pack")
    write_tiny_grading(base / "models" / "multicond_gradings" / TINY_GRADING)
    write_tiny_sd35_grading(base / "models" / "multicond_gradings" / TINY_SD35_GRADING)


def write_tiny_grading(path: Path) -> None:
    """A random grading over the tiny SDXL model's 17 layers, for workflows that load one."""
    import torch

    from multicond.core.balance import Grading, save_grading
    from multicond.core.inversion import ddim_timesteps
    from multicond.core.layers import UNetLayout

    layers = UNetLayout("sdxl", (1, 1, 1), (0, 2, 3), 2).layers  # tests/comfyui/tiny.py's SDXL shape
    timesteps = tuple(ddim_timesteps(50))
    generator = torch.Generator().manual_seed(0)
    grades = {f: torch.rand(len(timesteps), len(layers), generator=generator, dtype=torch.float64) for f in "qk"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grading(Grading("sdxl", layers, timesteps, grades, "tiny"), path)


def write_tiny_sd35_grading(path: Path) -> None:
    """A random grading in CB35's gradingSd35L format (layer_names + per-key q/k/v grades) for the tiny SD3.5's 2 joint
    layers, for SD3.5 workflows that load one."""
    import torch

    generator = torch.Generator().manual_seed(0)
    layers = [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    stats = {key: {f: torch.rand(len(layers), generator=generator).tolist() for f in "qkv"} for key in CB35_KEYS}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layer_names": layers, "stats": stats}, path)


def server_command(base: Path, port: int) -> list[str]:
    return [sys.executable, "main.py", "--cpu", "--listen", HOST, "--port", str(port),
            "--base-directory", str(base), "--disable-auto-launch",
            "--database-url", f"sqlite:///{(base / 'user' / 'comfy.db').as_posix()}"]


def wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"ComfyUI exited with {server.process.returncode} while starting:\n{server.log_tail()}")
        try:
            http_json(f"{server.url}/system_stats")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("comfy_base")
    prepare_base(base)
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "MULTICOND_TINY_MODELS": str(Path(__file__).parent / "tiny.py")}  # tiny models: threads only contend
    log = base / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(server_command(base, port), cwd=COMFYUI, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    running = Server(f"http://{HOST}:{port}", base, log, process)
    try:
        wait_until_ready(running)
        yield running
    finally:
        stop(process)


@pytest.fixture(scope="module")
def object_info(server: Server) -> dict:
    return http_json(f"{server.url}/object_info")


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def shrink_for_tiny_models(graph: dict[str, dict]) -> dict[str, dict]:
    """Tiny loader, 64 px, a few steps; everything else (the images it loads too) as the workflow has it."""
    graph = json.loads(json.dumps(graph))
    checkpoints = [node["inputs"]["ckpt_name"] for node in graph.values() if node["class_type"] == "CheckpointLoaderSimple"]
    family = "sdxl" if any("xl" in name.lower() for name in checkpoints) else "sd15"
    if any("sd3" in name.lower() for name in checkpoints):
        family = "sd35l"  # the tiny SD3.5-Large-like DiT of tests/comfyui/tiny_dit.py
    if any("flux1-dev" in name.lower() for name in checkpoints):
        family = TINY_FLUX_DEV
    adapters = [node for node in graph.values() if node["class_type"] == "ControlNetLoader"
                and "t2i" in node["inputs"]["control_net_name"].lower()]
    if adapters:
        family += "_shaped"  # a T2I-Adapter needs the real block structure
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = TINY_LOADER, {"family": family, "seed": 0}
        elif kind == "ControlNetLoader":
            loader = "MultiCondTest_TinyT2IAdapter" if node in adapters else "MultiCondTest_TinyControlNet"
            node["class_type"], node["inputs"] = loader, {"family": family, "seed": 0}
        elif kind in (*LATENTS, "ImageScale"):
            inputs.update(width=SIZE, height=SIZE)
        elif kind == "KSampler":
            inputs["steps"] = STEPS
        elif kind == "MultiCond_StyleReference":
            inputs.update(inversion_steps=INVERSION_STEPS, offset=INVERSION_OFFSET)
        elif kind == "MultiCond_LayerBalance" and family == "sd35l":
            inputs.update(grading=TINY_SD35_GRADING, lambda_s=TINY_SD35_LAMBDA_S)
        elif kind == "MultiCond_LayerBalance":
            inputs["grading"] = TINY_GRADING
        elif kind == "MultiCond_SpatialGuidance" and family not in TINY_DITS:
            inputs["weight"] = 100000.0  # the tiny random UNet's maps hardly depend on the latent (gradients ~1e-9)
    return graph


def nodes_of(graph: dict[str, dict], class_type: str) -> list[str]:
    return [node_id for node_id, node in graph.items() if node["class_type"] == class_type]


def queue(server: Server, graph: dict) -> str:
    try:
        answer = http_json(f"{server.url}/prompt", {"prompt": graph, "client_id": "multicond-test"})
    except urllib.error.HTTPError as error:
        pytest.fail(f"/prompt refused the graph ({error.code}): {error.read().decode(errors='replace')}")
    assert not answer.get("node_errors"), answer
    return answer["prompt_id"]


def wait_for_history(server: Server, prompt_id: str) -> dict:
    deadline = time.monotonic() + PROMPT_TIMEOUT_S
    while time.monotonic() < deadline:
        history = http_json(f"{server.url}/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return entry
        time.sleep(0.2)
    pytest.fail(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def execution_errors(entry: dict) -> list[dict]:
    return [data for kind, data in entry["status"].get("messages", []) if kind == "execution_error"]


def test_there_are_workflows() -> None:
    assert {path.stem for path in WORKFLOWS} >= {"1a StyleAligned - SDXL batch in one style",
                                                 "1b StyleAligned - SD1.5 batch in one style",
                                                 "1c StyleAligned - SDXL style from a reference image",
                                                 "1d StyleAligned - SD3.5 Large batch with Layer Balance",
                                                 "1e StyleAligned - Flux.1 dev batch in one style",
                                                 "1f StyleAligned - Flux.1 dev style from a reference image",
                                                 "3e Epsilon Blend - SD3.5 Large two styles in one image",
                                                 "3f Epsilon Blend - Flux.1 dev two styles in one image",
                                                 "3g Cross-Attention Blend - SD3.5 Large two styles in one image",
                                                 "3h Cross-Attention Blend - Flux.1 dev two styles in one image",
                                                 "4c Spatial Guidance - SD3.5 Large cat left of dog",
                                                 "4d Spatial Guidance - Flux.1 dev cat left of dog",
                                                 "5c Masked Adapter - SD3.5 Large canny ControlNet only in a box",
                                                 "5d Masked Adapter - Flux.1 dev canny ControlNet only in a box"}


def http_bytes(url: str) -> bytes:
    with _OPENER.open(url, timeout=HTTP_TIMEOUT_S) as response:
        return response.read()


def template_url(server: Server, file_name: str) -> str:
    """Where the frontend fetches a pack's template file (names have spaces: quoted, as a browser does)."""
    return f"{server.url}/api/workflow_templates/multicond/{urllib.parse.quote(file_name)}"


def test_server_lists_the_workflows_as_templates_with_thumbnails(server: Server) -> None:
    """ComfyUI serves a pack's example_workflows/ folder to the template browser, card picture `<name>.jpg` beside."""
    listed = http_json(f"{server.url}/workflow_templates").get("multicond", [])
    assert sorted(listed) == sorted(path.stem for path in WORKFLOWS)
    for path in WORKFLOWS:
        assert json.loads(http_bytes(template_url(server, path.name))) == load_workflow(path)
        assert http_bytes(template_url(server, f"{path.stem}.jpg")) == path.with_suffix(".jpg").read_bytes()


def test_the_pack_copied_the_example_inputs_into_the_input_folder(server: Server) -> None:
    """LoadImage lists the input folder's top level: the shipped images are there once the pack has loaded."""
    shipped = sorted(EXAMPLE_INPUTS.glob("*.png"))
    assert shipped
    for path in shipped:
        assert (server.base / "input" / path.name).read_bytes() == path.read_bytes(), path.name
    assert "MultiCond: copied the example workflows' input images" in server.log_tail(100_000)


def test_example_inputs_are_copied_once_and_never_overwritten(tmp_path: Path) -> None:
    from multicond.nodes.assets import copy_missing_files

    names = sorted(path.name for path in EXAMPLE_INPUTS.glob("*.png"))
    assert copy_missing_files(EXAMPLE_INPUTS, tmp_path) == names
    (tmp_path / names[0]).write_bytes(b"the user's own picture")
    assert copy_missing_files(EXAMPLE_INPUTS, tmp_path) == []
    assert (tmp_path / names[0]).read_bytes() == b"the user's own picture"
    (tmp_path / names[1]).unlink()
    assert copy_missing_files(EXAMPLE_INPUTS, tmp_path) == [names[1]]


def test_the_gradings_folder_is_created_and_the_log_says_where_gradings_come_from(tmp_path: Path) -> None:
    from multicond.nodes.assets import ensure_gradings_folder

    folder = tmp_path / "models" / "multicond_gradings"
    message = ensure_gradings_folder(folder)
    assert folder.is_dir() and message.startswith(f"MultiCond: created {folder}")
    assert "style_layer_grading" in message and "github.com/Nadavc220/conditional-balance " in message
    assert "gradingSd35L" in message and "github.com/Nadavc220/conditional-balance-sd35" in message
    assert ensure_gradings_folder(folder).startswith(f"MultiCond: no grading file in {folder}")
    (folder / "style_layer_grading").write_bytes(b"grading")
    assert ensure_gradings_folder(folder) is None


def test_the_user_folders_are_prepared_only_inside_a_comfyui_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A script or test that imports the nodes must not write into the ComfyUI tree; a server start does."""
    import logging
    import types

    import folder_paths

    from multicond.nodes import assets

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: [str(tmp_path / "models" / name)])
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assets.prepare_user_folders()
    assert not any(tmp_path.iterdir())

    running = types.SimpleNamespace(PromptServer=type("PromptServer", (), {"instance": object()}))
    monkeypatch.setitem(sys.modules, "server", running)
    with caplog.at_level(logging.INFO):
        assets.prepare_user_folders()
    shipped = sorted(path.name for path in EXAMPLE_INPUTS.glob("*.png"))
    assert sorted(path.name for path in (tmp_path / "input").iterdir()) == shipped
    assert (tmp_path / "models" / "multicond_gradings").is_dir()
    copied, created = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MultiCond")]
    assert copied.startswith("MultiCond: copied the example workflows' input images") and "created" in created


def test_the_masked_adapter_help_page_is_served(server: Server) -> None:
    with _OPENER.open(f"{server.url}/extensions/multicond/docs/MultiCond_MaskedAdapter.md", timeout=HTTP_TIMEOUT_S) as response:
        page = response.read().decode()
    assert "effect mask" in page and "not an inpainting mask" in page


def test_the_frontend_loads_the_layer_balance_extension(server: Server) -> None:
    """ComfyUI lists the pack's scripts for the frontend to import, and serves them with the module they import."""
    with _OPENER.open(f"{server.url}/extensions", timeout=HTTP_TIMEOUT_S) as response:
        scripts = json.loads(response.read().decode())
    assert "/extensions/multicond/js/layer_balance.js" in scripts
    with _OPENER.open(f"{server.url}/extensions/multicond/js/layer_balance_inputs.js", timeout=HTTP_TIMEOUT_S) as response:
        assert "export function unusedInputs" in response.read().decode()


def test_multicond_nodes_are_listed_with_tooltips(object_info: dict) -> None:
    for node in MULTICOND_NODES:
        assert node in object_info, f"{node} missing from /object_info"
        info = object_info[node]
        assert info.get("description"), f"{node}: no description"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node} input {name}: no tooltip"
        tooltips = info.get("output_tooltips") or []
        assert len(tooltips) == len(info["output"]) and all(tooltips), f"{node}: output tooltips {tooltips}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_nodes_and_widgets_are_valid(path: Path, object_info: dict) -> None:
    workflow = load_workflow(path)
    types = {node["type"] for node in workflow["nodes"]}
    assert types - FRONTEND_ONLY_NODES <= set(object_info), f"unknown node types {types - FRONTEND_ONLY_NODES - set(object_info)}"
    assert types & FRONTEND_ONLY_NODES, f"{path.name}: no Note explaining the workflow"
    assert types >= {"CheckpointLoaderSimple", "KSampler", "SaveImage"}
    problems = [problem for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY_NODES
                for problem in check_widget_values(node, object_info[node["type"]], FILE_INPUTS)]
    assert not problems + check_links(workflow), "\n".join(problems + check_links(workflow))


def test_converter_reads_a_workflow_the_frontend_saved(object_info: dict) -> None:
    """ComfyUI's own default template (saved by the frontend, with KSampler's control_after_generate value)."""
    spec = importlib.util.find_spec("comfyui_workflow_templates")
    template = Path(spec.origin).parent / "templates" / "default.json" if spec and spec.origin else None
    if template is None or not template.is_file():
        pytest.skip("comfyui_workflow_templates with templates/default.json is not installed")
    graph = ui_to_api(load_workflow(template), object_info)
    ksampler = graph["3"]["inputs"]
    assert ksampler == {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                        "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                        "latent_image": ["5", 0]}
    assert graph["5"]["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    assert graph["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_runs_on_the_server(path: Path, server: Server, object_info: dict) -> None:
    graph = shrink_for_tiny_models(ui_to_api(load_workflow(path), object_info))
    (latent,) = [node_id for kind in LATENTS for node_id in nodes_of(graph, kind)]
    (save,) = nodes_of(graph, "SaveImage")
    expected = graph[latent]["inputs"]["batch_size"]

    entry = wait_for_history(server, queue(server, graph))

    assert entry["status"]["status_str"] == "success", f"{execution_errors(entry)}\n{server.log_tail()}"
    images = entry["outputs"][save]["images"]
    assert len(images) == expected
    for image in images:
        assert (server.base / image["type"] / image["subfolder"] / image["filename"]).is_file(), image


def test_the_sd35_workflow_samples_as_cb35() -> None:
    """StyleAligned + Layer Balance on SD3.5 Large with CB35's defaults: shift 3, 28 euler steps at CFG 3.5, the 28
    most style-sensitive of the 38 joint layers from gradingSd35L."""
    (path,) = [path for path in WORKFLOWS if path.stem.startswith("1d ")]
    values = {node["type"]: node.get("widgets_values") for node in load_workflow(path)["nodes"]}
    assert values["CheckpointLoaderSimple"][0].startswith("sd3.5_large")
    assert values["ModelSamplingSD3"] == [3.0]
    assert values["KSampler"][2:6] == [28, 3.5, "euler", "normal"]
    assert values["MultiCond_LayerBalance"][:3] == ["grading", "gradingSd35L", 28.0]
    assert values["EmptySD3LatentImage"] == [1024, 1024, 4] and values["MultiCond_BatchPrompts"][1] == 4
    assert {"MultiCond_SharedAttention", "MultiCond_AdaINStyle", "CLIPTextEncode", "VAEDecode"} <= set(values)


FLUX_WORKFLOWS = [path for path in WORKFLOWS if "Flux" in path.stem]


# Nodes that hand on the conditioning they take (with a control attached): output 0 is the positive, 1 the negative.
CONTROL_NODES = ("ControlNetApplyAdvanced", "ControlNetApplySD3", "MultiCond_MaskedAdapter")


def prompts_the_model_sees(graph: dict[str, dict]) -> list[list]:
    """The positives the model is called with: the sampler's and Style Reference's (through the nodes that attach a
    ControlNet), and for an Epsilon Blend output its first and second prompts (the node hands the model those two)."""
    (sampler,) = nodes_of(graph, "KSampler")
    sources = [graph[sampler]["inputs"]["positive"]]
    sources += [graph[node_id]["inputs"]["positive"] for node_id in nodes_of(graph, "MultiCond_StyleReference")]
    seen = []
    for source in sources:
        while graph[source[0]]["class_type"] in CONTROL_NODES:
            source = graph[source[0]]["inputs"][("positive", "negative")[source[1]]]
        node = graph[source[0]]
        seen += ([node["inputs"]["first"], node["inputs"]["second"]] if node["class_type"] == "MultiCond_EpsilonBlend"
                 else [source])
    return seen


@pytest.mark.parametrize("path", FLUX_WORKFLOWS, ids=lambda path: path.stem)
def test_the_flux_workflows_sample_as_flux_dev(path: Path, object_info: dict) -> None:
    """Flux.1 dev as ComfyUI's own example: its fp8 checkpoint, Flux Guidance 3.5 on every prompt the model sees, CFG 1
    (no negative), euler/simple on an SD3 latent; the shrinker runs it on the tiny Flux-dev."""
    workflow = load_workflow(path)
    values = {node["type"]: node.get("widgets_values") for node in workflow["nodes"]}
    assert values["CheckpointLoaderSimple"] == ["flux1-dev-fp8.safetensors"]
    assert values["KSampler"][3:6] == [1.0, "euler", "simple"]
    assert "EmptySD3LatentImage" in values
    if path.stem.startswith("1"):  # StyleAligned: a batch of 4 at AlignedGen's size
        assert values["EmptySD3LatentImage"] == [1024, 1024, 4] and values["MultiCond_BatchPrompts"][1] == 4
        assert {"MultiCond_SharedAttention", "MultiCond_AdaINStyle"} <= set(values)
    graph = ui_to_api(workflow, object_info)
    guided = {node_id for node_id in nodes_of(graph, "FluxGuidance") if graph[node_id]["inputs"]["guidance"] == 3.5}
    positives = prompts_the_model_sees(graph)
    assert positives and all(source in guided for source, _ in positives), \
        f"{path.name}: a positive without Flux Guidance 3.5"
    for node_id in nodes_of(graph, "MultiCond_StyleReference"):
        assert graph[node_id]["inputs"]["inversion_cfg"] == 1.0  # Flux dev's guidance rides on the prompt
    shrunk = shrink_for_tiny_models(graph)
    (loader,) = nodes_of(shrunk, TINY_LOADER)
    assert shrunk[loader]["inputs"]["family"] == TINY_FLUX_DEV


def test_the_prompts_the_model_sees_are_the_blends_two_not_its_output() -> None:
    graph = {"1": {"class_type": "KSampler", "inputs": {"positive": ["2", 1]}},
             "2": {"class_type": "MultiCond_EpsilonBlend", "inputs": {"first": ["3", 0], "second": ["4", 0]}},
             "5": {"class_type": "MultiCond_StyleReference", "inputs": {"positive": ["6", 0]}},
             **{i: {"class_type": "FluxGuidance", "inputs": {}} for i in "346"}}
    assert prompts_the_model_sees(graph) == [["3", 0], ["4", 0], ["6", 0]]
    graph["1"]["inputs"]["positive"] = ["3", 0]
    assert prompts_the_model_sees(graph) == [["3", 0], ["6", 0]]
    # Through Apply ControlNet and Masked Adapter, each output back to the conditioning of its own kind.
    graph["1"]["inputs"]["positive"] = ["7", 0]
    graph["7"] = {"class_type": "MultiCond_MaskedAdapter", "inputs": {"positive": ["8", 0], "negative": ["8", 1]}}
    graph["8"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["4", 0], "negative": ["9", 0]}}
    graph["9"] = {"class_type": "CLIPTextEncode", "inputs": {}}
    assert prompts_the_model_sees(graph) == [["4", 0], ["6", 0]]
    graph["1"]["inputs"]["positive"] = ["7", 1]
    assert prompts_the_model_sees(graph) == [["9", 0], ["6", 0]]


EPSILON_BLEND_WORKFLOWS = [path for path in WORKFLOWS if path.stem.startswith("3") and "Epsilon Blend" in path.stem]
BLEND_PROMPTS = ("a cozy house in a village, minecraft style, blocky voxel art",
                 "a cozy house in a village, van gogh style, swirling brush strokes")


def prompt_text(graph: dict[str, dict], source: list) -> str:
    """The text of a CLIP Text Encode behind a conditioning, through Flux Guidance."""
    node = graph[source[0]]
    while node["class_type"] == "FluxGuidance":
        node = graph[node["inputs"]["conditioning"][0]]
    assert node["class_type"] == "CLIPTextEncode", node
    return node["inputs"]["text"]


@pytest.mark.parametrize("path", EPSILON_BLEND_WORKFLOWS, ids=lambda path: path.stem)
def test_the_epsilon_blend_workflows_blend_the_papers_two_styles(path: Path, object_info: dict) -> None:
    """Every model family: Minecraft on the left, Van Gogh on the right, the paper's sigmoid of sharpness 20, both of
    the node's outputs into the sampler, one image on a wide latent."""
    graph = ui_to_api(load_workflow(path), object_info)
    (blend,) = nodes_of(graph, "MultiCond_EpsilonBlend")
    inputs = graph[blend]["inputs"]
    assert (inputs["profile"], inputs["direction"], inputs["center"], inputs["sharpness"]) == \
        ("sigmoid", "left to right", 0.5, 20.0)
    assert tuple(prompt_text(graph, inputs[name]) for name in ("first", "second")) == BLEND_PROMPTS
    (sampler,) = nodes_of(graph, "KSampler")
    assert graph[sampler]["inputs"]["model"] == [blend, 0] and graph[sampler]["inputs"]["positive"] == [blend, 1]
    (latent,) = [graph[node_id]["inputs"] for kind in LATENTS for node_id in nodes_of(graph, kind)]
    assert latent["width"] > latent["height"] and latent["batch_size"] == 1


CROSS_ATTENTION_BLEND_WORKFLOWS = [path for path in WORKFLOWS if "Cross-Attention Blend" in path.stem]


@pytest.mark.parametrize("path", CROSS_ATTENTION_BLEND_WORKFLOWS, ids=lambda path: path.stem)
def test_the_cross_attention_blend_workflows_blend_the_papers_two_styles(path: Path, object_info: dict) -> None:
    """Every model family: Minecraft (the sampler's positive) on the left, Van Gogh (the node's second) on the right,
    the paper's cross-attention sigmoid of sharpness 30 on every layer, one image on a wide latent."""
    graph = ui_to_api(load_workflow(path), object_info)
    (blend,) = nodes_of(graph, "MultiCond_CrossAttnBlend")
    inputs = graph[blend]["inputs"]
    assert (inputs["profile"], inputs["direction"], inputs["center"], inputs["sharpness"]) == \
        ("sigmoid", "left to right", 0.5, 30.0)
    assert "layers" not in inputs and "mask" not in inputs
    (sampler,) = nodes_of(graph, "KSampler")
    assert graph[sampler]["inputs"]["model"] == [blend, 0]
    assert (prompt_text(graph, graph[sampler]["inputs"]["positive"]), prompt_text(graph, inputs["second"])) == \
        BLEND_PROMPTS
    (latent,) = [graph[node_id]["inputs"] for kind in LATENTS for node_id in nodes_of(graph, kind)]
    assert latent["width"] > latent["height"] and latent["batch_size"] == 1


DIT_CONTROLNET_WORKFLOWS = [path for path in WORKFLOWS if path.stem[:2] in ("5c", "5d")]


@pytest.mark.parametrize("path", DIT_CONTROLNET_WORKFLOWS, ids=lambda path: path.stem)
def test_the_dit_masked_adapter_workflows_mask_the_family_controlnet_in_the_box(path: Path, object_info: dict) -> None:
    """Apply ControlNet (with the VAE where the ControlNet encodes its hint: SD3.5) -> Masked Adapter -> sampler, the
    centred box of 5b, and the shrinker loads a tiny ControlNet of the tiny model's own family."""
    graph = ui_to_api(load_workflow(path), object_info)
    (apply,) = nodes_of(graph, "ControlNetApplyAdvanced")
    (masked,) = nodes_of(graph, "MultiCond_MaskedAdapter")
    (sampler,) = nodes_of(graph, "KSampler")
    (loader,) = nodes_of(graph, "ControlNetLoader")
    assert graph[masked]["inputs"]["positive"] == [apply, 0] and graph[masked]["inputs"]["negative"] == [apply, 1]
    assert graph[sampler]["inputs"]["positive"] == [masked, 0] and graph[sampler]["inputs"]["negative"] == [masked, 1]
    assert graph[graph[apply]["inputs"]["image"][0]]["class_type"] == "Canny"
    (composite,) = nodes_of(graph, "MaskComposite")
    assert graph[masked]["inputs"]["mask"] == [composite, 0]
    assert (graph[composite]["inputs"]["x"], graph[composite]["inputs"]["y"]) == (256, 256)
    sd35 = "SD3.5" in path.stem
    name = graph[loader]["inputs"]["control_net_name"]
    assert ("sd3.5_large_controlnet_canny" in name) if sd35 else ("flux" in name and "canny" in name), name
    assert ("vae" in graph[apply]["inputs"]) == sd35  # SD3.5's ControlNet encodes its hint; XLabs' reads the image
    shrunk = shrink_for_tiny_models(graph)
    (tiny_loader,) = nodes_of(shrunk, TINY_LOADER)
    (tiny_control,) = nodes_of(shrunk, "MultiCondTest_TinyControlNet")
    family = "sd35l" if sd35 else TINY_FLUX_DEV
    assert shrunk[tiny_loader]["inputs"]["family"] == shrunk[tiny_control]["inputs"]["family"] == family


COMPOSED = next(path for path in WORKFLOWS if path.stem.startswith("6 Composed"))
COMPOSED_EFFECT = 1e-5  # each node moves the tiny 2-step latent by 1e-4 and more; a rerun of one graph by 0


def bypassed(graph: dict[str, dict], node_id: str, object_info: dict) -> dict[str, dict]:
    """The graph without one node, as the frontend's bypass wires it: each output from an input of its type (and name).

    An optional input with no such source is left unconnected (Layer Balance's layers), a preview of an output with
    none is dropped; Spatial Guidance's positive has none, so a CLIP Text Encode of its text takes its place.
    """
    graph = json.loads(json.dumps(graph))
    node = graph.pop(node_id)
    info = object_info[node["class_type"]]
    types = {name: spec[0] for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()}
    for other_id, other in list(graph.items()):
        optional = object_info[other["class_type"]]["input"].get("optional", {})
        for name, value in list(other["inputs"].items()):
            if not (isinstance(value, list) and value[0] == node_id):
                continue
            wanted, output_name = info["output"][value[1]], info["output_name"][value[1]]
            candidates = [n for n, kind in types.items() if kind == wanted and n in node["inputs"]]
            candidates.sort(key=lambda n: n != output_name)  # the input of the output's own name first (negative)
            source = node["inputs"][candidates[0]] if candidates else None
            if source is not None:
                other["inputs"][name] = source
            elif name in optional:
                del other["inputs"][name]
            elif object_info[other["class_type"]].get("output_node"):  # a preview of the node's own output
                del graph[other_id]
                break
            elif node["class_type"] == "MultiCond_SpatialGuidance" and wanted == "CONDITIONING":
                graph[f"{node_id}_text"] = {"class_type": "CLIPTextEncode",
                                            "inputs": {"text": node["inputs"]["text"], "clip": node["inputs"]["clip"]}}
                other["inputs"][name] = [f"{node_id}_text", 0]
            else:
                raise AssertionError(f"no bypass for {node['class_type']} output {wanted} into {other['class_type']}.{name}")
    return graph


def final_latent(server: Server, graph: dict[str, dict], prefix: str) -> "Any":
    """The sampled latent of `graph`, saved by a SaveLatent node next to its KSampler."""
    from safetensors.torch import load_file

    graph = json.loads(json.dumps(graph))
    (sampler,) = nodes_of(graph, "KSampler")
    graph["multicond_save_latent"] = {"class_type": "SaveLatent",
                                      "inputs": {"samples": [sampler, 0], "filename_prefix": f"composed/{prefix}"}}
    entry = wait_for_history(server, queue(server, graph))
    assert entry["status"]["status_str"] == "success", f"{prefix}: {execution_errors(entry)}\n{server.log_tail()}"
    (saved,) = entry["outputs"]["multicond_save_latent"]["latents"]
    return load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]


def test_the_composed_workflow_keeps_every_nodes_effect(server: Server, object_info: dict) -> None:
    """StyleAligned + Layer Balance + masked ControlNet + Spatial Guidance: each node, bypassed, changes the result."""
    graph = shrink_for_tiny_models(ui_to_api(load_workflow(COMPOSED), object_info))
    full = final_latent(server, graph, "full")
    pack_nodes = [node_id for node_id, node in graph.items() if node["class_type"].startswith("MultiCond_")]
    assert {graph[node_id]["class_type"] for node_id in pack_nodes} == {
        "MultiCond_LayerBalance", "MultiCond_SharedAttention", "MultiCond_AdaINStyle", "MultiCond_SpatialGuidance",
        "MultiCond_MaskedAdapter"}
    for node_id in pack_nodes:
        kind = graph[node_id]["class_type"]
        without = final_latent(server, bypassed(graph, node_id, object_info), f"without_{kind}")
        difference = float((full - without).abs().max())
        assert difference > COMPOSED_EFFECT, f"{kind} has no effect in the composed workflow ({difference:.1e})"


# The nodes each DiT workflow is checked to depend on: each, bypassed, changes the sampled latent on the tiny DiT.
DIT_EFFECT_NODES = {"1e": ("MultiCond_SharedAttention", "MultiCond_AdaINStyle"),
                    "1f": ("MultiCond_StyleReference", "MultiCond_SharedAttention", "MultiCond_AdaINStyle"),
                    "3e": ("MultiCond_EpsilonBlend",), "3f": ("MultiCond_EpsilonBlend",),
                    "3g": ("MultiCond_CrossAttnBlend",), "3h": ("MultiCond_CrossAttnBlend",),
                    "4c": ("MultiCond_SpatialGuidance",), "4d": ("MultiCond_SpatialGuidance",),
                    "5c": ("MultiCond_MaskedAdapter",), "5d": ("MultiCond_MaskedAdapter",)}
DIT_EFFECT_WORKFLOWS = [path for path in WORKFLOWS if path.stem[:2] in DIT_EFFECT_NODES]


def test_every_dit_node_check_has_its_workflow() -> None:
    assert sorted(path.stem[:2] for path in DIT_EFFECT_WORKFLOWS) == sorted(DIT_EFFECT_NODES)


@pytest.mark.parametrize("path", [path for path in WORKFLOWS if path.stem.startswith("4")], ids=lambda path: path.stem)
def test_the_spatial_guidance_workflows_run_the_seeds_settings_and_dits_keep_their_weight(path: Path,
                                                                                          object_info: dict) -> None:
    """UNets: the paper's settings on every step; SD3.5 and Flux: the SD3 seed's (end 0.3, alpha 1.5, lambda_spatial
    0.5). The shrinker raises the weight for the tiny UNets only: a tiny DiT's maps follow the latent at 1000."""
    graph = ui_to_api(load_workflow(path), object_info)
    (node,) = nodes_of(graph, "MultiCond_SpatialGuidance")
    inputs = graph[node]["inputs"]
    dit = "SD3.5" in path.stem or "Flux" in path.stem
    seed = (0.3, 1.5, 0.5) if dit else (1.0, 0.75, 1.0)
    assert (inputs["weight"], inputs["end_percent"], inputs["alpha"], inputs["lambda_spatial"]) == (1000.0, *seed)
    (sampler,) = nodes_of(graph, "KSampler")
    positive = graph[sampler]["inputs"]["positive"]
    while graph[positive[0]]["class_type"] == "FluxGuidance":
        positive = graph[positive[0]]["inputs"]["conditioning"]
    assert positive == [node, 1] and graph[sampler]["inputs"]["model"] == [node, 0]
    shrunk = shrink_for_tiny_models(graph)
    assert shrunk[node]["inputs"]["weight"] == (1000.0 if dit else 100000.0)


@pytest.mark.parametrize("path", DIT_EFFECT_WORKFLOWS, ids=lambda path: path.stem)
def test_each_pack_node_of_a_dit_workflow_changes_the_result(path: Path, server: Server, object_info: dict) -> None:
    """On the tiny SD3.5 and Flux-dev through the server, each StyleAligned node, either blend, Spatial Guidance and the
    Masked Adapter, bypassed, changes the sampled latent (bypassing a blend leaves the first prompt alone, bypassing
    Spatial Guidance samples a plain encoding of its text, bypassing the Masked Adapter lets the ControlNet act on the
    whole image)."""
    graph = shrink_for_tiny_models(ui_to_api(load_workflow(path), object_info))
    tag = path.stem[:2]
    (loader,) = nodes_of(graph, TINY_LOADER)
    assert graph[loader]["inputs"]["family"] in ("sd35l", TINY_FLUX_DEV)
    full = final_latent(server, graph, f"{tag}_full")
    checked = [node_id for node_id, node in graph.items() if node["class_type"] in DIT_EFFECT_NODES[tag]]
    assert sorted(graph[node_id]["class_type"] for node_id in checked) == sorted(DIT_EFFECT_NODES[tag])
    for node_id in checked:
        kind = graph[node_id]["class_type"]
        without = final_latent(server, bypassed(graph, node_id, object_info), f"{tag}_without_{kind}")
        difference = float((full - without).abs().max())
        assert difference > COMPOSED_EFFECT, f"{kind} has no effect in {path.name} ({difference:.1e})"


def test_an_error_while_sampling_names_the_nodes_title_and_id(server: Server) -> None:
    """The host hands the node its id and the graph (with titles): an error raised inside the sampler names both."""
    graph = {
        "1": {"class_type": TINY_LOADER, "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house, minecraft style", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house, van gogh style", "clip": ["1", 1]}},
        "4": {"class_type": "MultiCond_EpsilonBlend", "_meta": {"title": "Blend left/right"},
              "inputs": {"model": ["1", 0], "first": ["2", 0], "second": ["3", 0], "profile": "sigmoid",
                         "direction": "left to right", "angle": 0.0, "center": 0.5, "sharpness": 20.0,
                         "ramp_width": 1.0, "weighting": "complementary"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 1, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/unwired"}},
    }
    entry = wait_for_history(server, queue(server, graph))
    assert entry["status"]["status_str"] == "error"
    (error,) = execution_errors(entry)
    assert "MultiCond_EpsilonBlend 'Blend left/right' (#4): input 'positive': the sampler's positive is not this " \
           "node's positive output" in error["exception_message"], error


def test_a_workflow_saved_before_an_input_was_appended_still_loads(object_info: dict) -> None:
    """Layer Balance gained group_norm last: a node saved with the 7 older values takes its default, as the frontend."""
    node = {"id": 5, "type": "MultiCond_LayerBalance", "mode": 0, "inputs": [],
            "widgets_values": ["grading", "style_layer_grading", 0.57, "all layers", 0.0, "output.1", 0.85]}
    graph = ui_to_api({"nodes": [node], "links": []}, object_info)
    assert graph["5"]["inputs"]["group_norm"] == "as the method" and graph["5"]["inputs"]["lambda_t"] == 0.85
