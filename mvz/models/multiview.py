"""The assembled multiview model: SDXL text encoders, the MV UNet, the camera adapter and the VAE.

It knows how to turn prompts into SDXL conditioning and cameras into adapter residuals; the sampling loop
lives in ``mvz.pipeline``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from mvz.models.attention import MVSettings
from mvz.models.cameras import CameraSet
from mvz.scheduler import guidance_embedding


@dataclass
class ModelInfo:
    """Where a model came from; goes into sidecars and manifests."""

    name: str
    sources: dict[str, str] = field(default_factory=dict)
    default_resolution: int = 768
    random_weights: bool = False
    lora: str | None = None
    lora_scale: float = 1.0


@dataclass
class PromptEmbeds:
    prompt_embeds: torch.Tensor  # [B, 77, D_ctx] penultimate hidden states of both encoders, concatenated
    text_embeds: torch.Tensor  # [B, P] pooled projection of text_encoder_2

    def repeat_views(self, num_views: int) -> PromptEmbeds:
        """[B, ...] -> [B·V, ...], views of one prompt contiguous."""
        return PromptEmbeds(
            self.prompt_embeds.repeat_interleave(num_views, dim=0),
            self.text_embeds.repeat_interleave(num_views, dim=0),
        )


def vae_fp16_safe(vae_config) -> bool:
    """Whether a VAE may run in fp16: diffusers' own flag, ``force_upcast: false`` (the fp16-fix weights; the
    stock SDXL VAE says true and overflows to NaN in fp16)."""
    get = vae_config.get if hasattr(vae_config, "get") else (lambda k, d: getattr(vae_config, k, d))
    return not bool(get("force_upcast", True))


@contextlib.contextmanager
def tf32_enabled(enabled: bool = True):
    """TF32 for matmuls and convolutions inside the block (restored after): the fp32 VAE's precision on a GPU."""
    if not enabled:
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class MultiviewModel:
    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        adapter,
        mv_settings: MVSettings,  # defaults (views, MV scale); each UNet call passes its own, see attention.py
        info: ModelInfo,
        scheduler_config: dict[str, Any] | None = None,
    ):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.adapter = adapter
        self.mv_settings = mv_settings
        self.info = info
        self.scheduler_config = scheduler_config or {}
        self._residual_cache: dict[tuple, list[torch.Tensor]] = {}

    # ---- geometry ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model runs: the camera adapter's device (it stays when engines serve and the torch UNet
        and VAE have been moved off the GPU, see :meth:`release_unet_and_vae`)."""
        return next(self.adapter.parameters()).device

    def release_unet_and_vae(self) -> None:
        """Move the torch UNet and VAE to the CPU and return their GPU memory (engines serve them now)."""
        from mvz.devices import release_device_memory

        self.unet.to("cpu")
        self.vae.to("cpu")
        release_device_memory()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def guidance_dim(self) -> int | None:
        return self.unet.config.time_cond_proj_dim

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "adapter": self.adapter,
        }

    def to(self, device=None, dtype=None) -> MultiviewModel:
        for name, module in self.modules().items():
            # the VAE keeps its own dtype policy (fp16 only with the fp16-fix weights); callers set it
            module.to(device=device, dtype=dtype if name != "vae" else None)
        self.clear_residual_cache()
        return self

    def eval(self) -> MultiviewModel:
        for module in self.modules().values():
            module.eval()
            module.requires_grad_(False)
        return self

    # ---- conditioning -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """SDXL conditioning: penultimate hidden states of both encoders concatenated, pooled from encoder 2."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds") and out.text_embeds is not None:
                pooled = out.text_embeds
        if pooled is None:
            raise RuntimeError("text_encoder_2 must be a CLIPTextModelWithProjection (it provides text_embeds)")
        return PromptEmbeds(torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype))

    def time_ids(self, height: int, width: int, n: int) -> torch.Tensor:
        """SDXL micro-conditioning [original_size, crop_top_left, target_size] = [H, W, 0, 0, H, W]."""
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return ids.expand(n, -1).contiguous()

    def guidance_cond(self, guidance_scale: float, n: int) -> torch.Tensor | None:
        """``timestep_cond``: the w-embedding of w = guidance_scale - 1 (LCM UNet), None for other UNets."""
        if self.guidance_dim is None:
            return None
        emb = guidance_embedding(guidance_scale - 1.0, self.guidance_dim, batch=n)
        return emb.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def camera_residuals(self, cameras: CameraSet, height: int, width: int) -> list[torch.Tensor]:
        """The T2I-Adapter outputs for one camera set, [V, C_i, h_i, w_i] x 4; cached per (cameras, size)."""
        key = (cameras, height, width, self.device, self.dtype)
        if key not in self._residual_cache:
            x = cameras.adapter_input(height, width).to(device=self.device, dtype=self.dtype)
            self._residual_cache[key] = [r.contiguous() for r in self.adapter(x)]
        return self._residual_cache[key]

    def clear_residual_cache(self) -> None:
        """Forget cached camera residuals (after changing the adapter's weights, or to time them)."""
        self._residual_cache.clear()

    # ---- latents <-> images -----------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[N,4,h,w] -> images [N,3,H,W] in [0,1].

        Runs in the VAE's own dtype even inside an autocast region (the trainer samples under
        ``accelerator.autocast()``): autocast would run an fp32 VAE's convolutions in fp16, which the
        non-fp16-fix SDXL VAE overflows (NaN images). An fp32 VAE runs with TF32 on a GPU."""
        vae_dtype = next(self.vae.parameters()).dtype
        scaled = latents.to(vae_dtype) / self.vae.config.scaling_factor
        tf32 = vae_dtype == torch.float32 and latents.device.type == "cuda"
        with torch.autocast(device_type=latents.device.type, enabled=False), tf32_enabled(tf32):
            images = self.vae.decode(scaled, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
