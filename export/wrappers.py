"""Tensor-only modules with the Denoiser / Decoder signatures, ready for tracing.

Their inputs and outputs (names, shapes, dtypes, sample inputs) are the graph I/O specs'
(``mvz.artifacts.graphs``); these modules only give a torch module that signature.

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

from mvz.artifacts.graphs import IOShape, UNetIO, VAEDecoderIO, torch_dtype_name
from mvz.models.attention import MVSettings

# the graphs' names, as the graph I/O specs own them (the exporter passes them to torch.onnx)
UNET_INPUTS, UNET_OUTPUTS = UNetIO.input_names, UNetIO.output_names
VAE_INPUTS, VAE_OUTPUTS = VAEDecoderIO.input_names, VAEDecoderIO.output_names


class UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module, num_views: int, latent_height: int, latent_width: int, mv_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.settings = MVSettings(int(num_views), int(latent_height), int(latent_width), float(mv_scale))

    def forward(self, sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond, cam_0, cam_1, cam_2, cam_3):
        args = (sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond, cam_0, cam_1, cam_2, cam_3)
        return UNetIO.call_unet(self.unet, dict(zip(UNET_INPUTS, args, strict=True)), self.settings)


class VAEDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return VAEDecoderIO.call_vae(self.vae, latents)


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
    """Random but realistic UNet inputs for tracing and parity, in the wrapper's order
    (``mvz.artifacts.graphs.UNetIO.sample_inputs``)."""
    feeds = UNetIO.of(model).sample_inputs(IOShape(rows, height, width), torch_dtype_name(unet_dtype), seed, device)
    return tuple(feeds[n] for n in UNET_INPUTS)


def vae_example_inputs(model, vae_dtype: torch.dtype, rows: int, height: int, width: int, seed: int = 1,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor]:
    feeds = VAEDecoderIO.of(model).sample_inputs(IOShape(rows, height, width), torch_dtype_name(vae_dtype), seed, device)
    return (feeds["latents"],)
