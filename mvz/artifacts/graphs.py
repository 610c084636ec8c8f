"""The graph I/O spec: one object per exported graph that owns its inputs and outputs.

For a call shape (:class:`IOShape`: rows = prompts x views, image height and width) each spec gives the
names, shapes and dtypes of its inputs and outputs, sample inputs (tracing, parity, checks), its TensorRT
profile and the call that feeds a torch module with named tensors. The ONNX wrappers (``export.wrappers``),
the ORT and TensorRT bindings (``engines``), the FLOP counter (``bench.flops``) and the engine checks all
read these, so a graph's contract is written once:

* :class:`UNetIO`: ``eps = unet(sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond,
  cam_0..cam_3)``; ``timestep`` is float32 ``[1]``, every other tensor in the export precision;
* :class:`VAEDecoderIO`: ``images[N,3,H,W] float32 in [0,1] = decoder(latents)``.

Pure dimensions, no weights: a spec is made from a loaded model (``of``) or a UNet config
(``from_config``), and is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

TEXT_TOKENS = 77  # CLIP's context length: prompt_embeds carry one row per token
TIME_IDS = 6  # SDXL micro-conditioning: (orig h, orig w, crop top, crop left, target h, target w)
SAMPLE_TIMESTEP = 499.0  # a mid-schedule timestep for sample inputs


@dataclass(frozen=True)
class IOShape:
    """One graph call: ``rows`` latents (prompts x views, views of a prompt contiguous) at ``height`` x
    ``width`` pixels."""

    rows: int
    height: int
    width: int

    @classmethod
    def of(cls, batch: int, views: int, height: int, width: int) -> IOShape:
        return cls(int(batch) * int(views), int(height), int(width))


@dataclass(frozen=True)
class TensorIO:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy name: float16, float32


def engine_profile(shapes: Mapping[str, Sequence[Any]], rows: int, min_rows: int | None = None) -> dict[str, list[list[int]]]:
    """TensorRT profile ``{input: [min, opt, max]}`` from input shapes whose symbolic axes (strings, as ONNX
    records a dynamic batch) span ``min_rows``..``rows`` (opt = max); all-int shapes give a static profile
    (min = opt = max, so CUDA graphs apply)."""
    out = {}
    for name, dims in shapes.items():
        hi = [d if isinstance(d, int) else rows for d in dims]
        lo = [d if isinstance(d, int) else (min_rows or rows) for d in dims]
        out[name] = [lo, hi, hi]
    return out


class _GraphIO:
    """What every graph spec shares: names, per-shape tensors, profiles, sample inputs, the feed."""

    name: ClassVar[str]
    input_names: ClassVar[tuple[str, ...]]
    output_names: ClassVar[tuple[str, ...]]

    def inputs(self, shape: IOShape, dtype: str) -> list[TensorIO]:
        raise NotImplementedError

    def outputs(self, shape: IOShape, dtype: str) -> list[TensorIO]:
        raise NotImplementedError

    def profile(self, shape: IOShape, dtype: str = "float16", min_rows: int | None = None) -> dict[str, list[list[int]]]:
        """The engine profile for ``shape``: static, or (``min_rows``) a dynamic row axis from ``min_rows``."""
        shapes = {t.name: (("rows", *t.shape[1:]) if min_rows and t.shape[0] == shape.rows else t.shape)
                  for t in self.inputs(shape, dtype)}
        return engine_profile(shapes, shape.rows, min_rows)

    def empty_inputs(self, shape: IOShape, dtype: str, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        """Uninitialised inputs (on the meta device by default: FLOP counting, shape checks)."""
        return {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device=device)
                for t in self.inputs(shape, dtype)}

    @classmethod
    def feed(cls, module, tensors: Mapping[str, torch.Tensor]):
        """``module(*inputs)`` with the named tensors in this graph's input order (the wrappers' signature)."""
        return module(*[tensors[n] for n in cls.input_names])

    @classmethod
    def check_names(cls, names: Sequence[str], what: str) -> None:
        """Refuse a graph or engine whose inputs are not this spec's (a pruned input is allowed)."""
        unknown = sorted(set(names) - set(cls.input_names))
        if unknown:
            from mvz.errors import ManifestMismatchError

            raise ManifestMismatchError(f"{what} has inputs {', '.join(unknown)} that the {cls.name} graph does not "
                                        f"take ({', '.join(cls.input_names)}).", "Re-export it (mvz export --force).")


@dataclass(frozen=True)
class UNetIO(_GraphIO):
    latent_channels: int
    vae_scale_factor: int
    context_dim: int  # prompt_embeds width (cross_attention_dim)
    text_dim: int  # pooled text embedding width
    guidance_dim: int  # timestep_cond width; 0: no w-embedding, a zeros [rows, 1] input stands in
    camera_channels: tuple[int, ...]  # channels of cam_0..cam_3 (the T2I-Adapter's outputs)

    name: ClassVar[str] = "unet"
    input_names: ClassVar[tuple[str, ...]] = (
        "sample", "timestep", "prompt_embeds", "text_embeds", "time_ids", "timestep_cond",
        "cam_0", "cam_1", "cam_2", "cam_3",
    )
    output_names: ClassVar[tuple[str, ...]] = ("eps",)
    # the camera adapter (full_adapter_xl) halves its grid once, after its second block
    CAMERA_STRIDES: ClassVar[tuple[int, ...]] = (1, 1, 2, 2)

    @classmethod
    def from_config(cls, unet_config: Mapping[str, Any], vae_scale_factor: int) -> UNetIO:
        cfg = dict(unet_config)
        ch = list(cfg["block_out_channels"])
        text_dim = int(cfg["projection_class_embeddings_input_dim"]) - TIME_IDS * int(cfg["addition_time_embed_dim"])
        return cls(int(cfg["in_channels"]), int(vae_scale_factor), int(cfg["cross_attention_dim"]), text_dim,
                   int(cfg.get("time_cond_proj_dim") or 0), (*ch, ch[-1]))

    @classmethod
    def of(cls, model) -> UNetIO:
        """The spec of a loaded ``MultiviewModel``'s UNet."""
        return cls.from_config(model.unet.config, model.vae_scale_factor)

    def inputs(self, shape: IOShape, dtype: str) -> list[TensorIO]:
        r, h, w = shape.rows, shape.height // self.vae_scale_factor, shape.width // self.vae_scale_factor
        cams = [TensorIO(f"cam_{i}", (r, c, h // (2 * s), w // (2 * s)), dtype)
                for i, (c, s) in enumerate(zip(self.camera_channels, self.CAMERA_STRIDES, strict=True))]
        return [
            TensorIO("sample", (r, self.latent_channels, h, w), dtype),
            TensorIO("timestep", (1,), "float32"),
            TensorIO("prompt_embeds", (r, TEXT_TOKENS, self.context_dim), dtype),
            TensorIO("text_embeds", (r, self.text_dim), dtype),
            TensorIO("time_ids", (r, TIME_IDS), dtype),
            TensorIO("timestep_cond", (r, self.guidance_dim or 1), dtype),
            *cams,
        ]

    @staticmethod
    def call_unet(unet, tensors: Mapping[str, torch.Tensor], settings) -> torch.Tensor:
        """``eps`` of a diffusers UNet (MV processors installed) on the named inputs; ``settings`` (an
        ``MVSettings``: views, latent grid, MV scale) reaches the attention processors through the call."""
        return unet(
            tensors["sample"],
            tensors["timestep"],
            encoder_hidden_states=tensors["prompt_embeds"],
            timestep_cond=tensors["timestep_cond"],
            added_cond_kwargs={"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]},
            down_intrablock_additional_residuals=[tensors[f"cam_{i}"] for i in range(4)],
            cross_attention_kwargs=settings.attention_kwargs(),
            return_dict=False,
        )[0]

    def outputs(self, shape: IOShape, dtype: str) -> list[TensorIO]:
        f = self.vae_scale_factor
        return [TensorIO("eps", (shape.rows, self.latent_channels, shape.height // f, shape.width // f), dtype)]

    def sample_inputs(self, shape: IOShape, dtype: str, seed: int = 0, device: torch.device | str = "cpu",
                      guidance_scale: float = 6.0) -> dict[str, torch.Tensor]:
        """Random but realistic inputs (tracing, parity): unit-normal latents and embeddings, the true
        ``time_ids``, the w-embedding of ``guidance_scale`` and small camera residuals."""
        from mvz.scheduler import guidance_embedding

        g = torch.Generator("cpu").manual_seed(seed)
        out = {}
        for t in self.inputs(shape, dtype):
            if t.name == "timestep":
                x = torch.tensor([SAMPLE_TIMESTEP])
            elif t.name == "time_ids":
                x = torch.tensor([[shape.height, shape.width, 0, 0, shape.height, shape.width]]).expand(*t.shape)
            elif t.name == "timestep_cond":
                x = guidance_embedding(guidance_scale, self.guidance_dim, batch=shape.rows) if self.guidance_dim \
                    else torch.zeros(t.shape)
            else:
                x = torch.randn(t.shape, generator=g) * (0.5 if t.name.startswith("cam_") else 1.0)
            out[t.name] = x.to(device=device, dtype=getattr(torch, t.dtype)).contiguous()
        return out


@dataclass(frozen=True)
class VAEDecoderIO(_GraphIO):
    latent_channels: int
    vae_scale_factor: int

    name: ClassVar[str] = "vae_decoder"
    input_names: ClassVar[tuple[str, ...]] = ("latents",)
    output_names: ClassVar[tuple[str, ...]] = ("images",)

    @classmethod
    def of(cls, model) -> VAEDecoderIO:
        return cls(int(model.latent_channels), int(model.vae_scale_factor))

    def inputs(self, shape: IOShape, dtype: str) -> list[TensorIO]:
        f = self.vae_scale_factor
        return [TensorIO("latents", (shape.rows, self.latent_channels, shape.height // f, shape.width // f), dtype)]

    @staticmethod
    def call_vae(vae, latents: torch.Tensor) -> torch.Tensor:
        """``images`` in [0, 1], float32, of a diffusers VAE: unscale, decode, ``/2 + 0.5``, clamp."""
        images = vae.decode(latents / float(vae.config.scaling_factor), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def outputs(self, shape: IOShape, dtype: str) -> list[TensorIO]:
        return [TensorIO("images", (shape.rows, 3, shape.height, shape.width), "float32")]

    def sample_inputs(self, shape: IOShape, dtype: str, seed: int = 1,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        g = torch.Generator("cpu").manual_seed(seed)
        (t,) = self.inputs(shape, dtype)
        return {t.name: torch.randn(t.shape, generator=g).to(device=device, dtype=getattr(torch, dtype))}


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the specs' numpy-style dtype names)."""
    return str(dtype).removeprefix("torch.")
