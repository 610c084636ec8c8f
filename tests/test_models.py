import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mvz.errors import CheckpointError, DeviceError, ModelNotFoundError
from mvz.models.cameras import DEFAULT_AZIMUTHS, CameraSet
from mvz.models.specs import ADAPTER_FILENAME
from mvz.paths import models_dir


def test_default_cameras_plucker():
    cams = CameraSet()
    assert cams.azimuths == DEFAULT_AZIMUTHS
    vec = cams.plucker_vectors()
    # azimuth 0 is passed as -90: the camera sits at (0, -1.8, 0) looking along +y
    torch.testing.assert_close(vec[0], torch.tensor([0.0, 1.0, 0.0, 0.0, -1.0, 0.0]), atol=1e-6, rtol=0)
    # azimuth 90 -> (1.8, 0, 0)
    torch.testing.assert_close(vec[2], torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    x = cams.adapter_input(32, 48)
    assert x.shape == (6, 6, 32, 48)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.all(x == x[:, :, :1, :1])  # spatially constant
    assert CameraSet.default(4).azimuths == (0.0, 90.0, 180.0, 270.0)


@pytest.mark.parametrize("height,width", [(64, 64), (96, 64), (128, 160)])
def test_camera_residual_shapes(tiny_model, height, width):
    res = tiny_model.camera_residuals(CameraSet(), height, width)
    ch = list(tiny_model.unet.config.block_out_channels)
    h, w = height // 8, width // 8
    expected = [(6, ch[0], h // 2, w // 2), (6, ch[1], h // 2, w // 2), (6, ch[2], h // 4, w // 4), (6, ch[2], h // 4, w // 4)]
    assert [tuple(r.shape) for r in res] == expected
    assert res[0] is tiny_model.camera_residuals(CameraSet(), height, width)[0]  # cached per camera set


def test_tiny_files_are_real_formats_and_round_trip(tiny_model):
    folder = models_dir() / "tiny"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (folder / sub).is_dir(), sub
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    sd = load_file(str(folder / ADAPTER_FILENAME))
    mv_keys = [k for k in sd if not k.startswith("adapter.")]
    n_blocks = sum(1 for k in mv_keys if k.endswith("attn1.processor.to_q_mv.weight"))
    # tiny: down_blocks.1 (2 attns x 1), down_blocks.2 (2 x 2), mid (1 x 2), up_blocks.0 (3 x 2), up_blocks.1 (3 x 1)
    assert n_blocks == 2 + 4 + 2 + 6 + 3
    assert len(mv_keys) == 5 * n_blocks
    assert len([k for k in sd if k.startswith("adapter.")]) == 38  # same layout as SDXL's T2I-Adapter
    # what was loaded is exactly what is on disk
    unet_sd = tiny_model.unet.state_dict()
    for k in mv_keys:
        torch.testing.assert_close(unet_sd[k], sd[k])
    for k, v in tiny_model.adapter.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    base = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in base.items():
        torch.testing.assert_close(unet_sd[k], v)


def _write_bad_adapter(tmp_path: Path, mutate) -> Path:
    src = models_dir() / "tiny"
    sd = load_file(str(src / ADAPTER_FILENAME))
    mutate(sd)
    out = tmp_path / ADAPTER_FILENAME
    save_file(sd, str(out))
    return out


def test_strict_adapter_loading_names_the_keys(tmp_path, tiny_model):
    from mvz.models.loading import load_model

    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_k_mv.weight"
    missing = _write_bad_adapter(tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match="1 missing keys.*to_k_mv"):
        load_model("tiny", adapter=str(missing))
    extra = _write_bad_adapter(tmp_path, lambda sd: sd.__setitem__("mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_ref.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="unexpected keys.*to_q_ref"):
        load_model("tiny", adapter=str(extra))
    shape = _write_bad_adapter(tmp_path, lambda sd: sd.__setitem__("adapter.conv_in.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="wrong shapes.*adapter.conv_in.bias"):
        load_model("tiny", adapter=str(shape))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model("tiny", adapter=str(garbage))
    with pytest.raises(ModelNotFoundError, match="neither a local path"):
        load_model("tiny", adapter=str(tmp_path / "nope.safetensors"))


def test_missing_model_components_are_listed(tmp_path, monkeypatch):
    from mvz.models.loading import load_model

    monkeypatch.setenv("MVZ_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    with pytest.raises(ModelNotFoundError) as err:
        load_model("sdxl-lcm")
    msg = str(err.value)
    for repo in ("stabilityai/stable-diffusion-xl-base-1.0", "latent-consistency/lcm-sdxl", "madebyollin/sdxl-vae-fp16-fix", "huanngzh/mv-adapter"):
        assert repo in msg
    with pytest.raises(ModelNotFoundError, match="not a preset"):
        load_model(str(tmp_path / "does-not-exist"))


def test_assembled_folder_with_broken_unet(tmp_path, tiny_model):
    import shutil

    from mvz.models.loading import load_model

    folder = tmp_path / "model"
    shutil.copytree(models_dir() / "tiny", folder)
    load_model(str(folder))  # a copy of the tiny folder is an assembled model
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(str(folder))


def test_device_and_dtype_errors():
    from mvz.models.loading import resolve_device, resolve_dtype

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError):
        resolve_device("tpu:7")
    with pytest.raises(DeviceError, match="fp16 on the CPU"):
        resolve_dtype("fp16", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


# SDXL's attention layout (published architecture): transformer blocks per channel width; 2048-d text context
SDXL_BLOCKS = {640: 2 * 2 + 3 * 2, 1280: 2 * 10 + 10 + 3 * 10}  # down, (mid), up -> 10 at 640, 60 at 1280
TEXT_DIM = 2048


def test_full_size_architecture_matches_published_counts():
    """--random-weights configs, counted by diffusers/peft on the meta device, against figures derived here
    from the published SDXL architecture (not from mvz): UNet 2,567,463,684 (+ the LCM w-projection),
    MV branch, LoRA rank 16."""
    from diffusers import UNet2DConditionModel

    from mvz.models.adapter import build_camera_adapter
    from mvz.models.attention import install_mv_processors, mv_processors
    from mvz.models.lora import add_lora, lora_state_dict
    from mvz.models.specs import shipped_config

    n_blocks = sum(SDXL_BLOCKS.values())
    # MV branch per self-attention block: to_q/k/v_mv (ch x ch, no bias) + to_out_mv.0 (ch x ch + bias)
    mv_expected = sum(n * (4 * ch * ch + ch) for ch, n in SDXL_BLOCKS.items())
    # LoRA r per Linear(in, out): r·(in + out). Per block: attn1 q,k,v,out (ch->ch); attn2 q, out (ch->ch),
    # k, v (2048->ch); the 4 MV linears (ch->ch)
    r = 16
    lora_expected = sum(n * r * (10 * 2 * ch + 2 * (TEXT_DIM + ch)) for ch, n in SDXL_BLOCKS.items())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_config("sdxl-lcm", "unet"))
        base = sum(p.numel() for p in unet.parameters())
        # the LCM UNet adds the w-embedding projection (256 -> 320, no bias) to SDXL's 2,567,463,684
        assert base == 2_567_463_684 + 256 * 320
        assert install_mv_processors(unet, init_from_base=False) == n_blocks == 70
        mv = sum(p.numel() for proc in mv_processors(unet).values() for p in proc.parameters())
        assert mv == mv_expected == 409_683_200
        adapter = build_camera_adapter(unet.config)
        assert sum(p.numel() for p in adapter.parameters()) == 81_240_000
        add_lora(unet, rank=r, init=True)
        sd = lora_state_dict(unet)
    assert len(sd) == n_blocks * 12 * 2  # 12 target Linears per block, A and B each
    assert sum(v.numel() for v in sd.values()) == lora_expected == 33_873_920
    key = "up_blocks.1.attentions.2.transformer_blocks.1.attn1.processor.to_out_mv.0.lora_B.weight"
    assert tuple(sd[key].shape) == (640, 16)


def test_model_card_written(tiny_model):
    card = json.loads((models_dir() / "tiny" / "mvz_model.json").read_text())
    assert card["name"] == "tiny" and card["default_resolution"] == 64


def test_vae_fp16_policy_is_the_vae_configs_force_upcast():
    """diffusers' policy: fp16 only where the VAE config says ``force_upcast: false`` (the fp16-fix weights);
    the stock SDXL VAE (force_upcast true, or unset) runs fp32 whatever the preset's name or the file's path."""
    from mvz.models.loading import default_vae_dtype

    fix, stock, unset = {"force_upcast": False}, {"force_upcast": True}, {}
    assert default_vae_dtype(fix, torch.float16) == torch.float16
    assert default_vae_dtype(stock, torch.float16) == torch.float32
    assert default_vae_dtype(unset, torch.float16) == torch.float32
    assert default_vae_dtype(stock, torch.bfloat16) == torch.bfloat16  # only fp16 overflows


def test_decode_runs_in_the_vae_dtype_inside_autocast(tiny_model):
    """The trainer samples under accelerator.autocast(); an fp32 VAE must still decode in fp32 there."""
    z = torch.randn(2, tiny_model.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model.decode_latents(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = tiny_model.decode_latents(z)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, ref, rtol=0, atol=1e-6)


def test_atomic_writes_honour_the_umask(tmp_path):
    """Outputs (images, checkpoints, reports) get the mode a plain write would give, not mkstemp's 0600."""
    import os

    from mvz.atomic import write_text

    old = os.umask(0o022)
    try:
        out = write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644
