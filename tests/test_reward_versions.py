"""HPSv2 v2.0 / v2.1 as separate reward names (never one version by folder order); one image convention."""

from __future__ import annotations

import shutil

import pytest
import torch

from mvz.errors import InputError, ModelNotFoundError
from mvz.paths import rewards_dir
from mvz.rewards import load_reward
from mvz.rewards.preprocess import resize
from mvz.rewards.tiny import ensure_tiny

V20, V21 = "HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One folder holding both versions' files (as ~/.cache/hpsv2 does), plus the tokenizer."""
    folder = tmp_path_factory.mktemp("hps")
    for name, fname in (("hpsv2", V20), ("hpsv2.1", V21)):
        src = ensure_tiny(name)
        shutil.copy(src, folder / fname)
        shutil.copy(src.parent / "open_clip_config.json", folder / "open_clip_config.json")
        shutil.copytree(src.parent / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    return folder


def test_each_name_loads_its_own_version(both):
    v20 = load_reward("hpsv2", checkpoint=both, device="cpu")
    v21 = load_reward("hpsv2.1", checkpoint=both, device="cpu")
    assert v20.checkpoint.endswith(V20) and v21.checkpoint.endswith(V21)
    assert (v20.name, v21.name) == ("hpsv2", "hpsv2.1")
    assert not torch.equal(v20.embed_text(["a cat"]), v21.embed_text(["a cat"]))  # other weights


def test_a_folder_with_only_the_other_version_is_not_used(both, tmp_path):
    only21 = tmp_path / "only21"
    only21.mkdir()
    shutil.copy(both / V21, only21 / V21)
    with pytest.raises(ModelNotFoundError, match=V20):
        load_reward("hpsv2", checkpoint=only21, device="cpu")
    home = rewards_dir() / "hpsv2"  # the default home holding only v2.1: v2.0 is not found there either
    if (home / V20).exists():
        pytest.skip(f"{home} holds a real {V20}")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(both / V21, home / V21)
    try:
        with pytest.raises(ModelNotFoundError):
            load_reward("hpsv2", device="cpu")
    finally:
        (home / V21).unlink()


def test_the_other_versions_file_is_refused_by_name(both):
    with pytest.raises(InputError, match="hpsv2.1"):
        load_reward("hpsv2", checkpoint=both / V21, device="cpu")
    with pytest.raises(InputError, match="'hpsv2'"):
        load_reward("hpsv2.1", checkpoint=both / V20, device="cpu")


@pytest.mark.parametrize(("name", "mode"), [("pickscore", "bicubic"), ("hpsv2", "bicubic"), ("imagereward", "bicubic"),
                                            ("hyperscore", "bilinear")])
def test_non_square_views_are_resized_to_the_square_input_without_a_crop(name, mode):
    reward = load_reward(name, preset="tiny", device="cpu")
    images = torch.rand(1, 6, 3, 40, 80, generator=torch.Generator().manual_seed(1))
    square = resize(images.reshape(6, 3, 40, 80), reward.image_size, mode).reshape(1, 6, 3, *[reward.image_size] * 2)
    got, want = reward.score(images, ["a red chair"]).per_set, reward.score(square, ["a red chair"]).per_set
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
