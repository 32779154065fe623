"""The pack as one system: every pair of its MODEL nodes in one graph, in both orders, on tiny SD1.5 and SDXL.

Each graph is sampled with the real sampler inside inference_mode. A pair passes when the run
succeeds and each node's own effect is present: the output differs from the same graph without
that node. Masked Adapter (a conditioning node) and Layer Balance (a layer selection) are composed
beside them, each node is followed by core nodes that clone the model, and a plain run afterwards
equals the plain run before (nothing leaks).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy_extras.nodes_freelunch as freelunch  # noqa: E402
import comfy_extras.nodes_model_advanced as model_advanced  # noqa: E402
import nodes as core_nodes  # noqa: E402
import torch  # noqa: E402

from multicond.core.errors import InputError  # noqa: E402
from multicond.nodes.adapter import MaskedAdapter  # noqa: E402
from multicond.nodes.balance import LayerBalance  # noqa: E402
from multicond.nodes.blend import CrossAttnBlend, EpsilonBlend  # noqa: E402
from multicond.nodes.reference import StyleReference  # noqa: E402
from multicond.nodes.spatial import SpatialGuidance  # noqa: E402
from multicond.nodes.style import AdaINStyle, SharedAttention  # noqa: E402

from . import tiny  # noqa: E402
from .graph import call  # noqa: E402
from .tiny_pack import TinyCheckpoint  # noqa: E402

PROMPT = "a photo of a cat to the left of a dog"
SECOND = "an oil painting, thick brush strokes"
BATCH, LATENT, STEPS = 3, 16, 2
# A node's effect on the tiny 2-step runs is 8e-5 (AdaIN beside Shared Attention) and more; graphs that differ only in
# the order of float operations differ by ~1e-6.
EFFECT = 2e-5


@dataclass
class Setup:
    """One family's tiny MODEL/CLIP/VAE/ControlNet and the inputs every graph shares."""

    kind: str
    model: Any
    clip: Any
    vae: Any
    positive: list
    negative: list
    second: list
    image: torch.Tensor
    control_net: Any
    cache: dict = field(default_factory=dict)


def encode(clip: Any, text: str) -> list:
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request) -> Setup:
    kind = request.param
    with torch.inference_mode():
        model, clip, vae = TinyCheckpoint().load(kind, 0)
        pixels = 8 * LATENT
        ramp = torch.linspace(0, 1, pixels)
        image = torch.stack([ramp[None, :].expand(pixels, -1), ramp[:, None].expand(-1, pixels),
                             torch.full((pixels, pixels), 0.5)], dim=-1)[None]
        from .tiny_pack import SDXL_CONTEXT

        control_net = tiny.build_controlnet(kind, 3, context_dim=SDXL_CONTEXT if kind == "sdxl" else None)
    return Setup(kind, model, clip, vae, encode(clip, PROMPT), encode(clip, ""), encode(clip, SECOND), image, control_net)


# --- the pack's MODEL nodes, each as a step of a graph ------------------------------------------


@dataclass
class State:
    """What flows along a graph: the model, the sampler's positive and negative."""

    model: Any
    positive: list
    negative: list


def shared_attention(s: Setup, state: State) -> State:
    (model,) = call(SharedAttention, model=state.model)
    return State(model, state.positive, state.negative)


def adain_style(s: Setup, state: State) -> State:
    (model,) = call(AdaINStyle, model=state.model)
    return State(model, state.positive, state.negative)


def style_reference(s: Setup, state: State) -> State:
    """A real reference image: Style Reference Image, then Shared Attention with the paper's real-image shift log 2."""
    (model,) = call(StyleReference, model=state.model, vae=s.vae, image=s.image, positive=s.positive,
                    negative=s.negative, inversion_steps=3, offset=1)
    (model,) = call(SharedAttention, model=model, score_shift=math.log(2))
    return State(model, state.positive, state.negative)


def epsilon_blend(s: Setup, state: State) -> State:
    model, positive = call(EpsilonBlend, model=state.model, first=state.positive, second=s.second)
    return State(model, positive, state.negative)


def cross_attn_blend(s: Setup, state: State) -> State:
    (model,) = call(CrossAttnBlend, model=state.model, second=s.second)
    return State(model, state.positive, state.negative)


def spatial_guidance(s: Setup, state: State) -> State:
    # The tiny random model's maps hardly depend on the latent: a strong weight shows the step.
    model, _ = call(SpatialGuidance, model=state.model, clip=s.clip, text=PROMPT, weight=100000.0)
    return State(model, state.positive, state.negative)  # the positive stays the graph's: the same PROMPT encoded


MODEL_NODES: dict[str, Callable[[Setup, State], State]] = {
    "SharedAttention": shared_attention, "AdaINStyle": adain_style, "StyleReference": style_reference,
    "EpsilonBlend": epsilon_blend, "CrossAttnBlend": cross_attn_blend, "SpatialGuidance": spatial_guidance,
}


def sample(s: Setup, state: State, seed: int = 42) -> torch.Tensor:
    return tiny.sample(state.model, s.kind, batch=BATCH, size=LATENT, steps=STEPS, positive=state.positive,
                       negative=state.negative, seed=seed)


def run_graph(s: Setup, names: tuple[str, ...], start: State | None = None) -> torch.Tensor:
    """The latent of a graph that applies `names` in order (cached per family)."""
    if start is None and names in s.cache:
        return s.cache[names]
    state = start or State(s.model, s.positive, s.negative)
    for name in names:
        state = MODEL_NODES[name](s, state)
    result = sample(s, state)
    if start is None:
        s.cache[names] = result
    return result


def assert_effect(with_node: torch.Tensor, without: torch.Tensor, what: str) -> None:
    assert torch.isfinite(with_node).all(), f"{what}: not finite"
    difference = (with_node - without).abs().max().item()
    assert difference > EFFECT, f"{what}: the output is the same as without it (max difference {difference:.2e})"


@pytest.fixture(scope="module")
def plain_before(setup: Setup) -> torch.Tensor:
    return run_graph(setup, ())


def test_each_node_alone_has_its_effect(setup, plain_before):
    for name in MODEL_NODES:
        assert_effect(run_graph(setup, (name,)), plain_before, name)


# Style Reference carries its own Shared Attention: with a second one, the later replaces the earlier (tested below).
PAIRS = [pair for pair in itertools.permutations(MODEL_NODES, 2) if set(pair) != {"SharedAttention", "StyleReference"}]


@pytest.mark.parametrize("first,second", PAIRS)
def test_a_pair_keeps_both_effects(setup, plain_before, first, second):
    both = run_graph(setup, (first, second))
    assert_effect(both, run_graph(setup, (second,)), f"{first} before {second}")
    assert_effect(both, run_graph(setup, (first,)), f"{second} after {first}")


@pytest.mark.parametrize("name", list(MODEL_NODES))
def test_beside_a_masked_controlnet(setup, name):
    """ControlNetApplyAdvanced + Masked Adapter (left half) on the conditioning, the node on the model."""
    positive, negative = call(core_nodes.ControlNetApplyAdvanced, positive=setup.positive, negative=setup.negative,
                              control_net=setup.control_net, image=setup.image)
    mask = torch.zeros(1, 8 * LATENT, 8 * LATENT)
    mask[..., : 4 * LATENT] = 1.0
    (masked_positive, masked_negative) = call(MaskedAdapter, positive=positive, negative=negative, mask=mask)
    start = State(setup.model, masked_positive, masked_negative)
    with_both = run_graph(setup, (name,), start)
    assert_effect(with_both, run_graph(setup, (), start), name)
    assert_effect(with_both, run_graph(setup, (name,), State(setup.model, positive, negative)), "MaskedAdapter")


@pytest.mark.parametrize("name", ["SharedAttention", "AdaINStyle", "CrossAttnBlend"])
def test_a_layer_selection_changes_what_a_node_does(setup, name):
    layers, _ = call(LayerBalance, model=setup.model, source="blocks", blocks="middle")
    node = {"SharedAttention": SharedAttention, "AdaINStyle": AdaINStyle, "CrossAttnBlend": CrossAttnBlend}[name]
    extra = {"second": setup.second} if name == "CrossAttnBlend" else {}
    (model,) = call(node, model=setup.model, layers=layers, **extra)
    selected = sample(setup, State(model, setup.positive, setup.negative))
    assert_effect(selected, run_graph(setup, (name,)), f"LayerBalance into {name}")
    assert_effect(selected, run_graph(setup, ()), name)


def model_sampling_discrete(model: Any) -> Any:
    return call(model_advanced.ModelSamplingDiscrete, model=model, sampling="eps", zsnr=False)[0]


def freeu(model: Any) -> Any:
    return call(freelunch.FreeU_V2, model=model)[0]


@pytest.mark.parametrize("name", list(MODEL_NODES))
@pytest.mark.parametrize("core", [model_sampling_discrete, freeu], ids=["ModelSamplingDiscrete", "FreeU_V2"])
def test_a_core_node_that_clones_the_model_after_the_node(setup, name, core):
    state = MODEL_NODES[name](setup, State(setup.model, setup.positive, setup.negative))
    after = sample(setup, State(core(state.model), state.positive, state.negative))
    core_alone = sample(setup, State(core(setup.model), setup.positive, setup.negative))
    assert_effect(after, core_alone, f"{name} followed by {core.__name__}")
    if core is model_sampling_discrete:  # eps sampling is what the tiny model has already: the same graph
        torch.testing.assert_close(after, run_graph(setup, (name,)), atol=0, rtol=0)


@pytest.mark.parametrize("name", list(MODEL_NODES))
def test_a_second_sampler_pass(setup, name):
    """KSampler, then a second KSampler at denoise 0.5 on its latent, both with the node's model."""
    state = MODEL_NODES[name](setup, State(setup.model, setup.positive, setup.negative))

    def two_passes(model: Any, positive: list) -> torch.Tensor:
        first = tiny.sample(model, setup.kind, batch=BATCH, size=LATENT, steps=STEPS, positive=positive,
                            negative=setup.negative)
        return tiny.sample(model, setup.kind, steps=STEPS, positive=positive, negative=setup.negative, latent=first,
                           denoise=0.5, seed=7)

    with_node = two_passes(state.model, state.positive)
    assert_effect(with_node, two_passes(setup.model, setup.positive), f"{name} over two passes")
    # the second pass is a fresh run: the same as running it alone on the first pass's latent
    first = run_graph(setup, (name,))
    alone = tiny.sample(state.model, setup.kind, steps=STEPS, positive=state.positive, negative=setup.negative,
                        latent=first, denoise=0.5, seed=7)
    torch.testing.assert_close(with_node, alone, atol=0, rtol=0)


def test_nothing_leaks_into_a_later_plain_run(setup, plain_before):
    for names in PAIRS:
        run_graph(setup, names)
    assert torch.equal(sample(setup, State(setup.model, setup.positive, setup.negative)), plain_before)
    assert "patches_replace" not in setup.model.model_options.get("transformer_options", {})
    assert not setup.model.wrappers


def test_style_reference_needs_a_style_node_with_its_reference_index(setup):
    (pinned,) = call(StyleReference, model=setup.model, vae=setup.vae, image=setup.image, positive=setup.positive,
                     negative=setup.negative, inversion_steps=3, offset=1, reference_index=1)
    with pytest.raises(InputError, match="MultiCond_StyleReference: input 'model': no Shared Attention or AdaIN Style"):
        sample(setup, State(pinned, setup.positive, setup.negative))
    for node in (SharedAttention, AdaINStyle):
        (other_row,) = call(node, model=pinned, reference_index=0)
        with pytest.raises(InputError, match="input 'reference_index': the image is pinned to row 1, but .* row 0"):
            sample(setup, State(other_row, setup.positive, setup.negative))
    (same_row,) = call(AdaINStyle, model=pinned, reference_index=1)
    assert_effect(sample(setup, State(same_row, setup.positive, setup.negative)),
                  sample(setup, State(call(AdaINStyle, model=setup.model, reference_index=1)[0], setup.positive,
                                      setup.negative)), "StyleReference with AdaIN Style")


# --- SD3/SD3.5: the style nodes with each other and with ModelSamplingSD3, in any order -----------


def test_sd3_style_nodes_and_model_sampling_sd3_in_any_order():
    """ModelSamplingSD3 clones the model and swaps its sampling object: before, between or after the style nodes,
    the graph samples the same; each node keeps its effect, and the loaded model stays unpatched."""
    pytest.importorskip("diffusers", reason="the tiny SD3 models come from diffusers: scripts/host_venv.sh installs it")
    from . import tiny_dit

    def shift(model: Any) -> Any:
        return call(model_advanced.ModelSamplingSD3, model=model, shift=6.0)[0]  # the tiny model's own shift is 3

    def shared(model: Any) -> Any:
        return call(SharedAttention, model=model)[0]

    def adain(model: Any) -> Any:
        return call(AdaINStyle, model=model)[0]

    def run(*steps: Callable[[Any], Any]) -> torch.Tensor:
        model = base
        for step in steps:
            model = step(model)
        return tiny_dit.sample(model)

    base = tiny_dit.build("sd35m")
    plain_before = run()
    first = run(shift, shared, adain)
    for order in [(shared, shift, adain), (adain, shared, shift), (shared, adain, shift)]:
        assert torch.equal(run(*order), first), [step.__name__ for step in order]
    assert_effect(first, run(shift, shared), "AdaINStyle after SharedAttention on SD3")
    assert_effect(first, run(shift, adain), "SharedAttention beside AdaINStyle on SD3")
    assert_effect(first, run(shared, adain), "ModelSamplingSD3 after the style nodes")
    assert torch.equal(run(), plain_before)
    assert not base.model_options["transformer_options"] and not base.wrappers and not base.object_patches
