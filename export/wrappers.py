"""Tensor-only modules with the Denoiser / Decoder signatures, ready for tracing.

* :class:`UNetWrapper`: ``eps = f(sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond,
  cam_0..cam_3)``. The camera residuals are graph inputs (the T2I-Adapter stays outside: its outputs are
  constants per camera set). The number of views, the latent grid and the MV scale are baked into each
  graph: the wrapper passes its own ``MVSettings`` to the UNet as ``cross_attention_kwargs`` (plain Python
  values, constants to the trace), so two wrappers over one UNet trace two graphs with their own grids. The
  batch axis stays symbolic because every reshape in ``mvz.models.attention`` keeps it as -1. ``timestep`` is float32 ``[1]``; every other tensor is in the
  export precision.
* :class:`VAEDecoderWrapper`: ``images[N,3,H,W] float32 in [0,1] = f(latents)``, the scaling factor and
  the ``/2 + 0.5`` clamp included (exactly ``MultiviewModel.decode_latents``).
* :class:`TextEncoderWrapper`: ``(hidden_states[-2], pooled or None) = f(input_ids)`` (optional stage).
"""

from __future__ import annotations

import torch
from torch import nn

from mvz.models.attention import MVSettings

UNET_INPUTS = (
    "sample", "timestep", "prompt_embeds", "text_embeds", "time_ids", "timestep_cond",
    "cam_0", "cam_1", "cam_2", "cam_3",
)
UNET_OUTPUTS = ("eps",)
VAE_INPUTS = ("latents",)
VAE_OUTPUTS = ("images",)


class UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module, num_views: int, latent_height: int, latent_width: int, mv_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.settings = MVSettings(int(num_views), int(latent_height), int(latent_width), float(mv_scale))

    def forward(self, sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond, cam_0, cam_1, cam_2, cam_3):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=prompt_embeds,
            timestep_cond=timestep_cond,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            down_intrablock_additional_residuals=[cam_0, cam_1, cam_2, cam_3],
            cross_attention_kwargs=self.settings.attention_kwargs(),
            return_dict=False,
        )[0]


class VAEDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents):
        images = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class TextEncoderWrapper(nn.Module):
    """CLIP text encoder -> (penultimate hidden states, pooled projection if it has one)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.with_projection = hasattr(encoder, "text_projection")

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        if self.with_projection:
            return hidden, out.text_embeds
        return (hidden,)


def unet_example_inputs(model, unet_dtype: torch.dtype, rows: int, height: int, width: int, seed: int = 0,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Random but realistic UNet inputs for tracing and parity: [rows, ...] each, float32 timestep."""
    from mvz.models.cameras import CameraSet
    from mvz.scheduler import guidance_embedding

    g = torch.Generator("cpu").manual_seed(seed)
    f = model.vae_scale_factor
    h, w = height // f, width // f
    ctx_dim = int(model.unet.config.cross_attention_dim)
    text_dim = int(model.text_encoder_2.config.projection_dim)
    cams = camera_residual_shapes(model, CameraSet.default(), height, width)
    gdim = model.guidance_dim or 1
    t = [
        torch.randn(rows, model.latent_channels, h, w, generator=g),
        torch.tensor([499.0]),
        torch.randn(rows, 77, ctx_dim, generator=g),
        torch.randn(rows, text_dim, generator=g),
        torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(rows, -1).contiguous(),
        guidance_embedding(6.0, gdim, batch=rows).float() if model.guidance_dim else torch.zeros(rows, 1),
        *[0.5 * torch.randn(rows, *s, generator=g) for s in cams],
    ]
    return tuple(x.to(device=device, dtype=torch.float32 if i == 1 else unet_dtype) for i, x in enumerate(t))


def camera_residual_shapes(model, cameras, height: int, width: int) -> list[tuple[int, ...]]:
    """The shapes of the T2I-Adapter's outputs, from the adapter run on the meta device (nothing computed:
    at full size the real run is a long fp16 convolution stack on a CPU)."""
    from export.onnx_export import weights_on_meta

    x = cameras.adapter_input(height, width).to(device="meta", dtype=model.dtype)
    with weights_on_meta(model.adapter), torch.no_grad():
        return [tuple(r.shape[1:]) for r in model.adapter(x)]


def vae_example_inputs(model, vae_dtype: torch.dtype, rows: int, height: int, width: int, seed: int = 1,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor]:
    g = torch.Generator("cpu").manual_seed(seed)
    f = model.vae_scale_factor
    z = torch.randn(rows, model.latent_channels, height // f, width // f, generator=g)
    return (z.to(device=device, dtype=vae_dtype),)
