"""Conditional Balance analysis on diffusers: a grading from a StyleAligned series of a tiny random model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from diffusers import FluxPipeline

from multicond.core.balance import (FEATURES, check_grading, graded_selection, load_grading, save_grading,
                                    token_statistics)
from multicond.core.diffusers_binding import tiny_dit_pipeline, tiny_pipeline
from multicond.core.diffusers_binding.analysis import (ProjectionRecorder, Series, SeriesStats, analyze_shard,
                                                       grade_series, job_seed, load_series, load_stats, merge_shards,
                                                       save_stats, shard_jobs)
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.flow_pipeline import flow_sigmas
from multicond.core.diffusers_binding.joint_style import JointStyleProcessor, _normed, dit_layout
from multicond.core.diffusers_binding.joint_style_flux import FluxPositions, FluxStyleProcessor, flux_layout
from multicond.core.diffusers_binding.style_aligned import StyleAlignedProcessor
from multicond.core.diffusers_binding.tiny import TINY_T5_TOKENS
from multicond.core.errors import InputError
from multicond.core.joint_style import JointStyle
from multicond.core.layers import DiTLayout, LayerId
from multicond.core.style import AdaINSettings, ShareSettings

from .conftest import assert_close_scaled

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SERIES = Series("a house", "a cat", ("in Van Gogh style", "in Monet style"), 2)
STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def one_shard(pipe) -> SeriesStats:
    return analyze_shard(pipe, SERIES, steps=STEPS)


def test_grading_end_to_end(pipe, one_shard: SeriesStats, tmp_path: Path) -> None:
    grading = grade_series(one_shard, name="tiny")
    assert grading.timesteps == tuple(int(t) for t in pipe.scheduler.timesteps)
    assert len(grading.timesteps) == STEPS and grading.family == "sd1"
    for feature in FEATURES:
        assert grading.grades[feature].shape == (STEPS, len(grading.layers))
        assert torch.isfinite(grading.grades[feature]).all()
    loaded = load_grading(save_grading(grading, tmp_path / "g.safetensors"))
    assert loaded.layers == grading.layers and all(torch.equal(loaded.grades[f], grading.grades[f]) for f in FEATURES)
    selection = graded_selection(loaded, 3)
    assert set(selection.schedule) == set(grading.timesteps)


def test_two_shards_equal_one(pipe, one_shard: SeriesStats, tmp_path: Path) -> None:
    files = [save_stats(analyze_shard(pipe, SERIES, i, 2, steps=STEPS), tmp_path / f"s{i}.safetensors")
             for i in range(2)]
    merged = merge_shards([load_stats(f) for f in files])
    one, two = grade_series(one_shard), grade_series(merged)
    assert one.timesteps == two.timesteps and one.layers == two.layers
    for feature in FEATURES:
        assert torch.equal(one.grades[feature], two.grades[feature])


def test_shards_cover_jobs_once() -> None:
    jobs = list(range(7))
    assert sorted(j for i in range(3) for j in shard_jobs(jobs, i, 3)) == jobs
    assert job_seed(10, 0, 1) == job_seed(10, 1, 1) != job_seed(10, 0, 0)  # same noise per sample across styles


def test_merge_refuses_overlap(one_shard: SeriesStats) -> None:
    with pytest.raises(ValueError, match="more than one shard"):
        merge_shards([one_shard, one_shard])


def test_recorded_statistics_are_the_targets_only() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    target = torch.randn(1, 16, 8)
    reference = 100 + 50 * torch.randn(1, 16, 8)  # far from the target: any leak shows
    target_u = torch.randn(1, 16, 8)
    batch = torch.cat([reference, target_u, reference, target])  # [ref, tgt] per CFG half
    seen = {}
    inner = StyleAlignedProcessor(AdaINSettings(True, True, True), ShareSettings())
    recording = replace(inner, layer=LayerId("input", 1, 0),
                        observe=ProjectionRecorder(lambda layer, f, m, s: seen.__setitem__(f, (m, s))))
    out = recording(attn, batch)
    assert torch.equal(out, inner(attn, batch))  # recording changes nothing
    for feature, project in zip(FEATURES, (attn.to_q, attn.to_k, attn.to_v)):
        mean, std = token_statistics(project(torch.cat([target_u, target])))
        # The recorder projects the whole 4-row batch, this the 2 target rows: another GEMM shape.
        assert_close_scaled(seen[feature][0], mean.flatten())
        assert_close_scaled(seen[feature][1], std.flatten())


def test_cli_writes_grading_and_heatmap(tmp_path: Path) -> None:
    series = tmp_path / "series.json"
    series.write_text(json.dumps({"reference_prompt": "a house", "content_prompt": "a cat",
                                  "styles": ["in Van Gogh style", "in Monet style"], "samples_per_style": 2}))
    assert main(["analyze", "--series", str(series), "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    grading = load_grading(tmp_path / "out" / "grading.safetensors")
    assert len(grading.timesteps) == 2
    from PIL import Image

    assert Image.open(tmp_path / "out" / "grading.png").size == (2 * 8, len(grading.layers) * 8)


@pytest.mark.parametrize("text, problem", [("not json", "cannot read JSON"), ('{"styles": []}', "missing field"),
                                           (json.dumps({"reference_prompt": "a", "content_prompt": "b",
                                                        "styles": ["x", "y"], "samples_per_style": 1}),
                                            "samples_per_style")])
def test_bad_series_file(tmp_path: Path, text: str, problem: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "series.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_series(path)
    with pytest.raises(SystemExit):
        main(["analyze", "--series", str(path)])
    err = capsys.readouterr().err
    assert "--series" in err and problem in err and "Fix:" in err


def test_analyze_refuses_a_launch_accelerate_did_not_distribute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    series = tmp_path / "series.json"
    series.write_text(json.dumps({"reference_prompt": "a house", "content_prompt": "a cat",
                                  "styles": ["in Van Gogh style", "in Monet style"], "samples_per_style": 2}))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it, while accelerate itself sees one process
    assert main(["analyze", "--series", str(series), "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "grading.safetensors").exists()


# ---------------------------------------------------------------- SD3/SD3.5 and Flux

@pytest.fixture(scope="module", params=["sd3", "flux"])
def dit_pipe(request: pytest.FixtureRequest):
    return tiny_dit_pipeline(request.param)


def test_a_dit_grading_covers_every_joint_attention_at_the_pipelines_timesteps(dit_pipe, tmp_path: Path) -> None:
    """Keys are int(1000·σ) of the steps sampled (CB35's keying), layers every joint attention of the model; the
    grading fits its own family's layout and no other."""
    stats = analyze_shard(dit_pipe, SERIES, steps=STEPS, guidance_scale=3.0, size=64,
                          max_sequence_length=TINY_T5_TOKENS)
    grading = load_grading(save_grading(grade_series(stats, "tiny-dit"), tmp_path / "g.safetensors"))
    flux = isinstance(dit_pipe, FluxPipeline)
    layout = flux_layout(dit_pipe.transformer) if flux else dit_layout(dit_pipe.transformer)
    assert grading.family == ("flux" if flux else "sd35") and grading.layers == tuple(layout.layers)
    assert grading.timesteps == tuple(int(1000 * s + 1e-3) for s in flow_sigmas(dit_pipe, STEPS, 64, 64))
    assert all(torch.isfinite(grading.grades[f]).all() for f in FEATURES)
    check_grading(grading, layout, "LayerBalance")
    other = DiTLayout("sd35", joint=2) if flux else DiTLayout("flux", double=2, single=2)
    with pytest.raises(InputError, match="is for"):
        check_grading(grading, other, "LayerBalance")


def dit_attention_call(pipe, observe):
    """One styled call of the first joint attention on 2 rows (reference, target) with `observe` set."""
    flux = isinstance(pipe, FluxPipeline)
    generator = torch.Generator().manual_seed(0)
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    hidden, text = torch.randn(2, 12, width, generator=generator), torch.randn(2, 5, width, generator=generator)
    block = pipe.transformer.transformer_blocks[0]
    style = JointStyle(AdaINSettings(), ShareSettings(), isolate_reference=True)
    if flux:
        processor = FluxStyleProcessor(style, 1, 0, LayerId("double", 0), positions=FluxPositions(shift_reference=False),
                                       observe=observe)
    else:
        processor = JointStyleProcessor(style, 1, 0, LayerId("joint", 0), observe=observe)
    with torch.no_grad():
        processor(block.attn, hidden, text)
    return block.attn, hidden


def test_dit_statistics_are_the_target_image_tokens_q_k_v_after_qk_norm(dit_pipe) -> None:
    """What the analysis records: the target row's image tokens only (no text, no reference), q and k after
    qk-norm and before RoPE, v as projected."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    attn, hidden = dit_attention_call(dit_pipe, ProjectionRecorder(lambda layer, f, m, s: seen.setdefault(f, (m, s))))
    heads = attn.heads
    target = hidden[1:]
    with torch.no_grad():
        expected = {"q": _normed(attn.norm_q, attn.to_q(target), heads),
                    "k": _normed(attn.norm_k, attn.to_k(target), heads), "v": attn.to_v(target)}
    for feature in FEATURES:
        mean, std = token_statistics(expected[feature])
        assert_close_scaled(seen[feature][0], mean.flatten())
        assert_close_scaled(seen[feature][1], std.flatten())


def test_analyze_grades_a_dit_from_the_command_line(tmp_path: Path) -> None:
    series = tmp_path / "series.json"
    series.write_text(json.dumps({"reference_prompt": "a house", "content_prompt": "a cat",
                                  "styles": ["in Van Gogh style", "in Monet style"], "samples_per_style": 2}))
    assert main(["analyze", "--family", "flux", "--series", str(series), "--steps", "2",
                 "--out", str(tmp_path / "out")]) == 0
    grading = load_grading(tmp_path / "out" / "grading.safetensors")
    assert grading.family == "flux" and [str(layer) for layer in grading.layers] == ["double.0", "double.1",
                                                                                     "single.0", "single.1"]
    from PIL import Image

    assert Image.open(tmp_path / "out" / "grading.png").size == (2 * 8, 4 * 8)
