"""Conditional Balance core: grading files, per-timestep selection, and the JSD analysis math."""

from __future__ import annotations

import codecs
import io
import itertools
import math
import os
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from multicond.core.balance import (Grading, check_grading, graded_selection, grade, image_pairs, jsd_diagonal_gaussian, load_grading,
                          nearest_timestep, restricted_unpickle, save_grading, select_at, shared_at,
                          style_layer_count, token_statistics, trimmed_mean)
from multicond.core.errors import InputError
from multicond.core.layers import (SD1, SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, SDXL, DiTLayout, LayerId,
                                   LayerSelection)
from multicond.core.style import AdaINSettings, allowed_adain

# The project's shared/ folder sits beside the checkout (and beside CI's clone).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "conditional-balance"
ORIGINALS = ["style_layer_grading", "style_balance_grading_v"]
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="published gradings not found")
CB35_FILE = DATA.parent / "conditional-balance-sd35" / "gradingSd35L"
needs_cb35 = pytest.mark.skipif(not CB35_FILE.is_file(), reason="CB35's gradingSd35L not found in shared/data")
# int(1000·σ) of FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(28): CB35's keys (dit.md §4.2).
CB35_KEYS = (1000, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737, 707, 675, 640, 602, 560,
             515, 464, 409, 347, 278, 199, 110, 8)
CB35_LAMBDA_S = 28  # CB35 style_gen_img.py:46: 28 of SD3.5-L's 38 joint layers


class _TestUnpickler(pickle.Unpickler):
    # Independent of core.balance: numpy scalars rebuilt from their raw bytes with np.frombuffer.
    def find_class(self, module: str, name: str):
        if name == "scalar":
            return lambda dtype, data: np.frombuffer(data, dtype=dtype)[0]
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise pickle.UnpicklingError(f"{module}.{name}")


def _raw(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return _TestUnpickler(io.BytesIO(archive.read(name))).load()


def _torch_zip(path: Path, payload: bytes, folder: str = "archive") -> Path:
    # The torch.save zip layout: <folder>/data.pkl next to byteorder and version.
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{folder}/data.pkl", payload)
        archive.writestr(f"{folder}/byteorder", "little")
        archive.writestr(f"{folder}/version", "3\n")
    return path


def _random_grading(seed: int = 0, features: tuple[str, ...] = ("q", "k", "v")) -> Grading:
    g = torch.Generator().manual_seed(seed)
    timesteps = tuple(range(981, 0, -20))
    grades = {f: torch.rand(len(timesteps), len(SDXL.layers), generator=g, dtype=torch.float64) for f in features}
    return Grading("sdxl", SDXL.layers, timesteps, grades, f"random{seed}")


# ---------------------------------------------------------------- the published files

@needs_data
@pytest.mark.parametrize("file", ORIGINALS)
def test_original_loads_with_expected_shape(file: str) -> None:
    grading = load_grading(DATA / file)
    assert grading.family == "sdxl" and len(grading.layers) == 70 and set(grading.layers) == set(SDXL.layers)
    assert grading.timesteps == tuple(range(981, 0, -20))
    assert set(grading.grades) == ({"q", "k", "v"} if file.endswith("_v") else {"q", "k"})
    assert grading.name == ("image_series_v_rabbit" if file.endswith("_v") else "combined_texture_v2")
    check_grading(grading, SDXL, "LayerBalance")


@needs_data
@pytest.mark.parametrize("file", ORIGINALS)
@pytest.mark.parametrize("t", [981, 1])
def test_original_top30_matches_independent_parse(file: str, t: int) -> None:
    raw = _raw(DATA / file)
    names = [n.removesuffix(".processor") for n in raw["layer_names"]]
    selection = select_at(load_grading(DATA / file), float(t), 30)
    for feature in ("q", "k"):
        lowest = np.argsort(np.array(raw["stats"][t][feature], dtype=np.float64), kind="stable")[:30]
        assert {SDXL.diffusers_path(layer) for layer in selection[feature]} == {names[i] for i in lowest}
    assert shared_at(selection) == selection["q"] | selection["k"]


@needs_data
def test_published_grading_numbers_survive_loading() -> None:
    raw = _raw(DATA / ORIGINALS[1])
    grading = load_grading(DATA / ORIGINALS[1])
    expected = np.array([raw["stats"][t]["v"] for t in grading.timesteps], dtype=np.float64)
    np.testing.assert_array_equal(grading.grades["v"].numpy(), expected)


@needs_data
def test_check_grading_refuses_another_family() -> None:
    with pytest.raises(InputError, match="sdxl but the model is sd1"):
        check_grading(load_grading(DATA / ORIGINALS[0]), SD1, "LayerBalance")


# ---------------------------------------------------------------- errors

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no grading file") as info:
        load_grading(tmp_path / "nope")
    assert (info.value.node, info.value.input_name) == ("LayerBalance", "grading")
    assert "conditional-balance" in info.value.fix


@needs_data
def test_corrupt_files(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    truncated.write_bytes((DATA / ORIGINALS[0]).read_bytes()[:5000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    bad_pickle = _torch_zip(tmp_path / "bad_pickle", b"\x80\x02not a pickle")
    not_a_grading = _torch_zip(tmp_path / "list", pickle.dumps([1, 2, 3], protocol=2))
    for path in (truncated, garbage, bad_pickle, not_a_grading, tmp_path / "bad.json"):
        if path.suffix == ".json":
            path.write_text("{ not json")
        with pytest.raises(InputError, match=path.name):
            load_grading(path, node="N", input_name="g")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"layer_names": [], "stats": {}, "x": _Evil(marker)}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system is not allowed"):
        restricted_unpickle(payload)
    with pytest.raises(InputError, match="not allowed"):
        load_grading(_torch_zip(tmp_path / "evil", payload))
    assert not marker.exists()
    # Object-dtype numpy scalars would unpickle arbitrary objects; the scalar reconstructor refuses them.
    with pytest.raises(pickle.UnpicklingError):
        # scalar(dtype("O")): GLOBAL scalar, GLOBAL dtype, ("O8", False, True) REDUCE, TUPLE1, REDUCE.
        restricted_unpickle(b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n"
                            b"X\x02\x00\x00\x00O8\x89\x88\x87R\x85R.")


def test_unknown_layer_names(tmp_path: Path) -> None:
    names = [f"down_blocks.0.attentions.0.transformer_blocks.{i}.attn1.processor" for i in range(2)]
    payload = pickle.dumps({"layer_names": names, "stats": {1: {"q": [0.5, 0.5], "k": [0.5, 0.5]}}}, protocol=2)
    with pytest.raises(InputError, match="not a self-attention layer of SDXL"):
        load_grading(_torch_zip(tmp_path / "sd1ish", payload))
    path = save_grading(_random_grading(), tmp_path / "g.json")
    path.write_text(path.read_text().replace('"input.4.0"', '"input.99.0"'))
    # The file is well formed (tiny test models have such layers); the model it is used with refuses it.
    with pytest.raises(InputError, match="input.99.0 are not in this model"):
        check_grading(load_grading(path), SDXL, "LayerBalance")
    path.write_text(path.read_text().replace('"input.99.0"', '"upper.4"'))
    with pytest.raises(InputError, match="unknown layer names"):
        load_grading(path)


def test_check_grading_refuses_layers_the_model_lacks() -> None:
    small = Grading("sd1", SDXL.layers[:2], (1,), {f: torch.zeros(1, 2) for f in "qk"})
    with pytest.raises(InputError, match="not in this model"):
        check_grading(small, SD1, "LayerBalance")


# ---------------------------------------------------------------- save / load

@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    original = _random_grading(3)
    # Shuffle the layer order: the file's order must survive, not a canonical one.
    order = torch.randperm(70, generator=torch.Generator().manual_seed(1)).tolist()
    original = Grading("sdxl", tuple(original.layers[i] for i in order), original.timesteps,
                       {f: t[:, order] for f, t in original.grades.items()}, "shuffled")
    loaded = load_grading(save_grading(original, tmp_path / f"grading{suffix}"))
    assert (loaded.family, loaded.layers, loaded.timesteps, loaded.name) == \
        (original.family, original.layers, original.timesteps, original.name)
    assert set(loaded.grades) == set(original.grades)
    for f in original.grades:
        assert torch.equal(loaded.grades[f], original.grades[f])


def test_safetensors_without_grading_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="no grading metadata"):
        load_grading(tmp_path / "model.safetensors")


# ---------------------------------------------------------------- using a grading

def test_style_layer_count() -> None:
    assert style_layer_count(0.43, 70, "N") == 30  # the paper's default, truncated as int(0.43 * 70)
    assert style_layer_count(0.57, 70, "N") == 39
    assert style_layer_count(1.0, 70, "N") == 70
    assert style_layer_count(30.0, 70, "N") == 30 and style_layer_count(70, 70, "N") == 70
    assert style_layer_count(0.0, 70, "N") == 0 and style_layer_count(0.01, 70, "N") == 0  # no layer, as the original
    for bad in (-0.2, 1.5, 30.5, 71.0, float("nan"), float("inf")):
        with pytest.raises(InputError) as info:
            style_layer_count(bad, 70, "LayerBalance")
        assert info.value.input_name == "lambda_s" and "0.43" in info.value.fix


def test_nearest_timestep() -> None:
    grading = _random_grading()
    assert nearest_timestep(grading, 999.0) == 981
    assert nearest_timestep(grading, 0.3) == 1
    assert nearest_timestep(grading, 950.0) == 941 and nearest_timestep(grading, 955.0) == 961
    assert nearest_timestep(grading, 951.0) == 961  # a tie goes to the noisier key
    assert nearest_timestep(grading, 500.4) == 501


def test_select_lowest_and_stable() -> None:
    grading = _random_grading(features=("q", "k"))
    grading.grades["q"][5] = torch.arange(70, 0, -1, dtype=torch.float64)  # layer 69 lowest, then 68, …
    grading.grades["k"][5] = 0.5  # all tied: a stable sort keeps file order
    selection = select_at(grading, float(grading.timesteps[5]) + 3, 4)
    assert selection["q"] == frozenset(SDXL.layers[66:70])
    assert selection["k"] == frozenset(SDXL.layers[:4])
    assert shared_at(selection) == frozenset(SDXL.layers[:4] + SDXL.layers[66:70])


# ---------------------------------------------------------------- analysis math

def test_token_statistics_match_unbiased_std_plus_eps() -> None:
    x = torch.randn(3, 17, 5, dtype=torch.float64)
    mean, std = token_statistics(x)
    assert mean.shape == std.shape == (3, 5)
    torch.testing.assert_close(mean, x.mean(1))
    torch.testing.assert_close(std, (x.var(1, unbiased=True) + 1e-5).sqrt())


def test_jsd_properties() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    s1 = torch.rand(4, 8, generator=g, dtype=torch.float64) + 0.1
    s2 = torch.rand(4, 8, generator=g, dtype=torch.float64) + 0.1
    torch.testing.assert_close(jsd_diagonal_gaussian(m1, s1, m1, s1), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(jsd_diagonal_gaussian(m1, s1, m2, s2), jsd_diagonal_gaussian(m2, s2, m1, s1))
    assert (jsd_diagonal_gaussian(m1, s1, m2, s2) > 0).all()
    # 1-D by hand: N(0, 1) and N(2, 9); midpoint N(1, 5):
    # KL1 = ½(1/5 + 1/5 − 1 + ln 5), KL2 = ½(9/5 + 1/5 − 1 + ln 5/9).
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    expected = 0.25 * (0.4 + math.log(25 / 9))
    assert jsd_diagonal_gaussian(one(0), one(1), one(2), one(3)).item() == pytest.approx(expected, rel=1e-12)
    # Dimensions add up.
    torch.testing.assert_close(jsd_diagonal_gaussian(m1, s1, m2, s2),
                               sum(jsd_diagonal_gaussian(m1[:, d:d + 1], s1[:, d:d + 1], m2[:, d:d + 1], s2[:, d:d + 1])
                                   for d in range(8)))


def test_image_pairs_count_each_pair_once() -> None:
    styles, samples = 4, 5
    first, second, same = image_pairs(styles, samples)
    pairs = list(zip(first.tolist(), second.tolist()))
    assert sorted(pairs) == list(itertools.combinations(range(styles * samples), 2))  # each unordered pair once
    assert int(same.sum()) == math.comb(samples, 2) * styles
    assert int((~same).sum()) == math.comb(styles, 2) * samples**2
    for (i, j), s in zip(pairs, same.tolist()):
        assert s == (i // samples == j // samples)  # style-major: image = style * samples + sample


def test_grade_matches_brute_force_and_vectorises() -> None:
    styles, samples, batch, dim = 3, 4, 5, 6
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(styles, 1, batch, dim, generator=g, dtype=torch.float64) * 3
    means = (centres + 0.3 * torch.randn(styles, samples, batch, dim, generator=g, dtype=torch.float64)).flatten(0, 1)
    stds = torch.rand(styles * samples, batch, dim, generator=g, dtype=torch.float64) + 0.5
    result = grade(means, stds, styles, samples, chunk=7)
    assert result.shape == (batch,)
    for b in range(batch):
        same, diff = [], []
        for i, j in itertools.combinations(range(styles * samples), 2):
            jsd = jsd_diagonal_gaussian(means[i, b], stds[i, b], means[j, b], stds[j, b]).item()
            (same if i // samples == j // samples else diff).append(jsd)
        assert result[b].item() == pytest.approx(np.mean(same) / np.mean(diff), rel=1e-10)
    assert (result < 1).all()  # images cluster by style here, so same-style JSD is the smaller
    identical = torch.ones(styles * samples, dim, dtype=torch.float64)
    assert grade(identical, identical, styles, samples).item() == 1.0  # both means 0 → 1
    with pytest.raises(ValueError):
        grade(identical[:-1], identical[:-1], styles, samples)


def test_trimmed_mean() -> None:
    gradings = [_random_grading(seed) for seed in range(5)]
    gradings[2] = Grading("sdxl", gradings[2].layers, gradings[2].timesteps,
                          {f: t for f, t in gradings[2].grades.items() if f != "v"}, "qk only")
    combined = trimmed_mean(gradings)
    assert set(combined.grades) == {"q", "k"} and combined.layers == gradings[0].layers
    stack = np.stack([g.grades["k"].numpy() for g in gradings])
    np.testing.assert_allclose(combined.grades["k"].numpy(), np.sort(stack, axis=0)[1:-1].mean(axis=0))
    # Another layer order is matched by layer id, not by column.
    flipped = gradings[4]
    gradings[4] = Grading("sdxl", flipped.layers[::-1], flipped.timesteps,
                          {f: t.flip(1) for f, t in flipped.grades.items()})
    torch.testing.assert_close(trimmed_mean(gradings).grades["q"], combined.grades["q"])
    with pytest.raises(InputError, match="at least 3"):
        trimmed_mean(gradings[:2])
    with pytest.raises(InputError, match="differ"):
        trimmed_mean(gradings[:2] + [Grading("sdxl", SDXL.layers, (1,), {f: torch.zeros(1, 70) for f in "qk"})])


def test_graded_selection_follows_the_handler_per_timestep():
    g = torch.Generator().manual_seed(7)
    layers = SDXL.layers[:6]
    grading = Grading("sdxl", layers, (981, 501, 1), {f: torch.rand(3, 6, generator=g, dtype=torch.float64) for f in "qkv"}, "t")
    selection = graded_selection(grading, 2)
    for timestep, probe in ((981, 990.0), (501, 600.0), (1, 0.0)):
        chosen = select_at(grading, timestep, 2)
        for layer in layers:
            expected = {f for f in "qkv" if layer in chosen[f]} | ({"share"} if layer in chosen["q"] | chosen["k"] else set())
            assert selection.features(layer, probe) == expected
    assert selection.layers == frozenset(layer for t in (981, 501, 1) for f in "qkv" for layer in select_at(grading, t, 2)[f])


def test_a_grading_with_v_decides_adain_on_values():
    """The original applies AdaIN to v wherever its v grading picks a layer (adain_handler_balanced.py:318-335)."""
    g = torch.Generator().manual_seed(8)
    grades = {f: torch.rand(2, 6, generator=g, dtype=torch.float64) for f in "qkv"}
    with_v = graded_selection(Grading("sdxl", SDXL.layers[:6], (981, 1), grades, "v"), 2)
    without_v = graded_selection(Grading("sdxl", SDXL.layers[:6], (981, 1), {f: grades[f] for f in "qk"}, "qk"), 2)
    assert with_v.graded_values and not without_v.graded_values
    off = AdaINSettings(queries=True, keys=True, values=False)
    assert allowed_adain(off, frozenset({"q", "v"}), with_v.graded_values) == AdaINSettings(True, False, True)
    assert allowed_adain(off, frozenset({"q", "v"}), without_v.graded_values) == AdaINSettings(True, False, False)
    assert allowed_adain(off, frozenset({"k"}), with_v.graded_values) == AdaINSettings(False, True, False)


def test_a_graded_selection_shares_no_group_norm_unless_told():
    """Conditional Balance never shares GroupNorm (FALSE_SA_ARGS, conditional-balance handlers/__init__.py:10)."""
    g = torch.Generator().manual_seed(9)
    grades = {f: torch.rand(2, 6, generator=g, dtype=torch.float64) for f in "qk"}
    graded = graded_selection(Grading("sdxl", SDXL.layers[:6], (981, 1), grades, "g"), 2)
    assert not graded.shares_group_norm(True) and not graded.shares_group_norm(False)
    assert replace(graded, group_norm=True).shares_group_norm(False)
    blocks = LayerSelection("sdxl", frozenset(SDXL.layers[:2]), "two")
    assert blocks.shares_group_norm(True) and not blocks.shares_group_norm(False)


# ---------------------------------------------------------------- SD3.5: CB35's gradingSd35L

def _cb35_top(grades: list[float], count: int) -> frozenset[LayerId]:
    # CB35's `argsort(grades)[:λs]` (Handler.__init__, :302-307), re-stated with sorted(); layer i = joint block i.
    return frozenset(LayerId("joint", i) for i in sorted(range(len(grades)), key=grades.__getitem__)[:count])


def _flow_sigmas(steps: int = 28, shift: float = 3.0, train_steps: int = 1000) -> list[float]:
    # diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps: σ from 1 down to its shifted σ_min (the shifted
    # 1/1000 of the training table), then shifted: shift·σ / (1 + (shift − 1)·σ); ComfyUI's `normal` likewise.
    def shifted(sigma: float) -> float:
        return shift * sigma / (1 + (shift - 1) * sigma)

    return [shifted(s) for s in np.linspace(1.0, shifted(1.0 / train_steps), steps).tolist()]


@needs_cb35
def test_cb35_grading_loads_as_sd35_joint_layers() -> None:
    raw = torch.load(CB35_FILE, weights_only=True)
    grading = load_grading(CB35_FILE)
    assert grading.family == "sd35" and grading.layers == SD35_LARGE.layers
    assert grading.timesteps == CB35_KEYS and set(grading.grades) == {"q", "k", "v"}
    for row, t in enumerate(CB35_KEYS):
        for f in "qkv":
            assert grading.grades[f][row].tolist() == raw["stats"][t][f]
    check_grading(grading, SD35_LARGE, "LayerBalance")  # the 38-layer SD3.5-L table: accepted


@needs_cb35
def test_cb35_selection_equals_the_handlers_sets_at_every_key() -> None:
    """For every key t: AdaIN q/k/v on topQ/topK/topV(t); shared attention on topQ ∩ topK (CB35 :157, :321-341)."""
    stats = torch.load(CB35_FILE, weights_only=True)["stats"]
    count = style_layer_count(CB35_LAMBDA_S, len(SD35_LARGE.layers), "LayerBalance")
    assert count == 28
    selection = graded_selection(load_grading(CB35_FILE), count)
    shared_sizes = []
    for t in CB35_KEYS:
        for f in "qkv":  # ties would leave argsort's order open; the file has none, so the sets are CB35's own
            assert len(set(stats[t][f])) == 38
        top = {f: _cb35_top(stats[t][f], count) for f in "qkv"}
        shared = top["q"] & top["k"]
        shared_sizes.append(len(shared))
        for layer in SD35_LARGE.layers:
            expected = {f for f in "qkv" if layer in top[f]} | ({"share"} if layer in shared else set())
            assert selection.features(layer, float(t)) == expected, (t, layer)
    # dit.md §4.2: q ∩ k holds 24–27 layers at every t, so q-or-k sharing would differ from CB35's at many steps.
    assert min(shared_sizes) >= 24 and max(shared_sizes) <= 27 and min(shared_sizes) < 28
    assert selection.graded_values and selection.group_norm is False


def test_the_28_step_shift_3_sigmas_take_their_own_keys() -> None:
    """1000·σ of the 28-step schedule truncates to CB35's keys; the nearest key is that one, where rounding is not."""
    grading = Grading("sd35", SD35_LARGE.layers, CB35_KEYS, {f: torch.zeros(28, 38) for f in "qk"}, "keys")
    scaled = [1000.0 * sigma for sigma in _flow_sigmas()]
    assert [int(t) for t in scaled] == list(CB35_KEYS)
    assert [nearest_timestep(grading, t) for t in scaled] == list(CB35_KEYS)
    assert any(round(t) not in CB35_KEYS for t in scaled)  # why the lookup is nearest, not an exact key


@needs_cb35
@pytest.mark.parametrize("layout,match", [
    (SD35_MEDIUM, "joint.24, joint.25.*not in this model"),
    (SD3_MEDIUM, "is for sd35 but the model is sd3"),
    (SDXL, "is for sd35 but the model is sdxl"),
])
def test_cb35_grading_on_another_model_is_refused(layout, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        check_grading(load_grading(CB35_FILE), layout, "LayerBalance")
    assert (info.value.node, info.value.input_name) == ("LayerBalance", "grading")


def test_a_dit_grading_must_grade_every_joint_layer() -> None:
    two = Grading("sd35", SD35_LARGE.layers[:2], (1000,), {f: torch.zeros(1, 2) for f in "qk"}, "two")
    with pytest.raises(InputError, match="grades 2 attention layers but the model has 38"):
        check_grading(two, SD35_LARGE, "LayerBalance")
    check_grading(two, DiTLayout("sd35", joint=2), "LayerBalance")
    sdxl = _random_grading()
    with pytest.raises(InputError, match="is for sdxl but the model is sd35"):
        check_grading(sdxl, SD35_LARGE, "LayerBalance")


def _cb35_format(layers: int, keys: tuple[int, ...], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"layer_names": [f"transformer_blocks.{i}.attn.processor" for i in range(layers)],
            "stats": {t: {f: torch.rand(layers, generator=g).tolist() for f in "qkv"} for t in keys}}


def test_a_torch_saved_cb35_format_file_loads_and_saves(tmp_path: Path) -> None:
    raw = _cb35_format(3, (1000, 500, 8), seed=5)
    torch.save(raw, tmp_path / "gradingTiny")
    grading = load_grading(tmp_path / "gradingTiny")
    expected = ("sd35", DiTLayout("sd35", joint=3).layers, (1000, 500, 8))
    assert (grading.family, grading.layers, grading.timesteps) == expected
    assert grading.grades["v"][1].tolist() == raw["stats"][500]["v"]
    for suffix in (".json", ".safetensors"):
        again = load_grading(save_grading(grading, tmp_path / f"g{suffix}"))
        assert (again.family, again.layers, again.timesteps) == (grading.family, grading.layers, grading.timesteps)
        torch.testing.assert_close(again.grades["k"], grading.grades["k"])


def test_a_malicious_cb35_format_file_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = _cb35_format(2, (1000,), seed=6)
    raw["x"] = _Evil(marker)
    with pytest.raises(InputError, match="not allowed"):
        load_grading(_torch_zip(tmp_path / "evil35", pickle.dumps(raw, protocol=2)))
    assert not marker.exists()


def test_a_cb35_shared_set_is_q_and_k_where_the_unet_one_is_q_or_k() -> None:
    g = torch.Generator().manual_seed(10)
    grades = {f: torch.rand(4, 6, generator=g, dtype=torch.float64) for f in "qk"}
    keys = (1000, 700, 400, 8)
    dit_grading = Grading("sd35", DiTLayout("sd35", joint=6).layers, keys, grades, "dit")
    dit, unet = graded_selection(dit_grading, 3), graded_selection(Grading("sdxl", SDXL.layers[:6], keys, grades), 3)
    differs = False
    for t in keys:
        chosen = select_at(dit_grading, t, 3)
        shared_dit = {layer.number for layer in dit_grading.layers if "share" in dit.features(layer, t)}
        shared_unet = {i for i, layer in enumerate(SDXL.layers[:6]) if "share" in unet.features(layer, t)}
        assert shared_dit == {layer.number for layer in chosen["q"] & chosen["k"]}
        assert shared_unet == {layer.number for layer in chosen["q"] | chosen["k"]}
        differs |= shared_dit != shared_unet
    assert differs  # the seed gives at least one step where the two rules disagree
