"""Prompts -> multiview images: encode, camera residuals, few-step LCM sampling (standard | ZMV), decode.

The sampler talks to the network only through the backend-agnostic contracts of DESIGN.md:

    eps = denoise(sample[B·V,4,h,w], timestep[1], prompt_embeds[B·V,77,D], text_embeds[B·V,P],
                  time_ids[B·V,6], timestep_cond[B·V,G], cam_0, cam_1, cam_2, cam_3)
    images[B·V,3,H,W] in [0,1] = decode(latents[B·V,4,h,w])

views of one prompt contiguous. Every backend (torch, compiled torch, ONNX Runtime, TensorRT) implements
these, so this loop, the trainer's sampler and the benchmark never know which one runs.

Randomness: each prompt has its own CPU generator seeded with its seed; it draws the initial noise and
then every step's noise, so a batch of prompts gives exactly the images of one prompt at a time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mvz.errors import InputError, require_finite
from mvz.models.attention import MVSettings
from mvz.models.cameras import CameraSet
from mvz.models.multiview import MultiviewModel
from mvz.scheduler import LCMSchedule, inverse_step, policy_step
from mvz.spec import DEFAULT_GUIDANCE, DEFAULT_STEPS, HOUSE_LIMITS, SampleSpec, default_azimuths

# VAE views decoded per call: 2 keeps the fp32 SDXL VAE's 768 px activations (~2.5 GiB per image, estimated, not
# measured) within the 16 GiB generate budget next to the UNet engine; a smaller chunk only costs launches.
DEFAULT_VAE_VIEWS_PER_CALL = 2


class Denoiser(Protocol):
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        timestep_cond: torch.Tensor,
        cam_0: torch.Tensor,
        cam_1: torch.Tensor,
        cam_2: torch.Tensor,
        cam_3: torch.Tensor,
    ) -> torch.Tensor: ...


class Decoder(Protocol):
    def __call__(self, latents: torch.Tensor) -> torch.Tensor: ...


class TorchDenoiser:
    """The PyTorch backend of the Denoiser contract (gradients flow if the caller enables them).

    ``unet`` may be any callable with the UNet's signature (e.g. a ``torch.compile``'d UNet); default the
    model's own. ``channels_last`` feeds the sample in channels-last memory format. The multiview settings
    of each call (``num_views``, the latent size read from the sample, ``mv_scale``) go to the attention
    processors as ``cross_attention_kwargs``: nothing shared is written, so denoisers over one UNet never
    see each other's settings.
    """

    def __init__(self, model: MultiviewModel, num_views: int, unet=None, channels_last: bool = False, name: str = "torch",
                 mv_scale: float | None = None):
        self.model = model
        self.num_views = num_views
        self.unet = unet if unet is not None else model.unet
        self.channels_last = channels_last
        self.name = name
        defaults = getattr(model, "mv_settings", None) or MVSettings()
        self.mv_scale = defaults.mv_scale if mv_scale is None else float(mv_scale)

    def with_views(self, num_views: int) -> TorchDenoiser:
        """A denoiser over the same UNet for ``num_views`` views (this one is left as it is)."""
        other = copy.copy(self)
        other.num_views = int(num_views)
        return other

    def settings(self, sample: torch.Tensor) -> MVSettings:
        """The multiview settings of a call on ``sample[B·V, C, h, w]``."""
        return MVSettings(self.num_views, int(sample.shape[-2]), int(sample.shape[-1]), self.mv_scale)

    def __call__(self, sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond, cam_0, cam_1, cam_2, cam_3):
        return self.forward(self.settings(sample), sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond,
                            cam_0, cam_1, cam_2, cam_3)

    def forward(self, settings: MVSettings, sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond,
                cam_0, cam_1, cam_2, cam_3):
        """One UNet call with explicit multiview settings (what a CUDA-graph capture bakes in)."""
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=prompt_embeds,
            timestep_cond=timestep_cond,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            down_intrablock_additional_residuals=[cam_0, cam_1, cam_2, cam_3],  # fresh list: the UNet pops it
            cross_attention_kwargs=settings.attention_kwargs(),
            return_dict=False,
        )[0]


class TorchDecoder:
    name = "torch"

    def __init__(self, model: MultiviewModel, batch: int | None = DEFAULT_VAE_VIEWS_PER_CALL):
        self.model = model
        self.batch = batch  # decode at most this many views per VAE call (chunks of views); None = all at once

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.batch or latents.shape[0] <= self.batch:
            return self.model.decode_latents(latents)
        return torch.cat([self.model.decode_latents(c) for c in latents.split(self.batch)], dim=0)


@dataclass
class Conditioning:
    """Everything the denoiser needs besides (sample, timestep), for B·V rows, in the model dtype."""

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    timestep_cond: torch.Tensor  # w-embedding of the sampling guidance
    timestep_cond_inv: torch.Tensor  # w-embedding of the ZMV inversion guidance
    cams: list[torch.Tensor]  # 4 camera residuals, tiled per prompt

    def args(self, inverse: bool = False) -> tuple:
        cond = self.timestep_cond_inv if inverse else self.timestep_cond
        return (self.prompt_embeds, self.text_embeds, self.time_ids, cond, *self.cams)

    def select(self, rows: torch.Tensor | slice) -> Conditioning:
        return Conditioning(
            self.prompt_embeds[rows], self.text_embeds[rows], self.time_ids[rows], self.timestep_cond[rows],
            self.timestep_cond_inv[rows], [c[rows] for c in self.cams],
        )


@dataclass
class Trajectory:
    """What the trainer needs to recompute log-probs: per step the state, the action and its log-prob."""

    states: torch.Tensor  # [B·V, S, C, h, w] float32 (ZMV step 0 records the inverted latent)
    next_states: torch.Tensor  # [B·V, S, C, h, w] float32
    log_probs: torch.Tensor  # [B·V, S] float32, per-view mean log-prob
    timesteps: list[int]  # [S]
    prev_timesteps: list[int]  # [S] (the last maps to itself)


@dataclass
class SampleResult:
    images: torch.Tensor | None  # [B, V, 3, H, W] float32 in [0,1], on CPU
    latents: torch.Tensor  # [B·V, C, h, w] final denoised latent D (float32)
    trajectory: Trajectory | None
    nfe: int
    timings: dict[str, float] = field(default_factory=dict)


def validate_prompts(prompts: Sequence[str]) -> None:
    if not prompts:
        raise InputError("no prompt given.", "Pass a prompt or a --prompts file with one prompt per line.")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise InputError("a prompt is empty.", "Give every prompt some text.")


def validate_request(prompts: Sequence[str], steps: int, num_views: int, height: int, width: int, multiple: int) -> None:
    """The prompts, and the numbers of a request by ``mvz.spec``'s rules, for a model of this size multiple."""
    validate_prompts(prompts)
    azimuths = default_azimuths(num_views) if num_views >= 1 else ()
    SampleSpec(steps=steps, azimuths=azimuths, height=height, width=width).check(
        HOUSE_LIMITS.narrowed(resolution_multiple=multiple))


def denoiser_for_views(denoiser, num_views: int):
    """``denoiser`` for ``num_views`` views, never changed in place: one made for them as it is, else its
    ``with_views`` copy; a fixed-shape engine made for other views is refused."""
    made_for = getattr(denoiser, "num_views", None)
    if made_for is None or made_for == num_views:
        return denoiser
    if hasattr(denoiser, "with_views"):
        return denoiser.with_views(num_views)
    raise InputError(f"this backend was made for {made_for} views, got {num_views}.",
                     f"Ask for {made_for} views, or export for {num_views}.")


class MultiviewPipeline:
    def __init__(self, model: MultiviewModel, denoiser: Denoiser | None = None, decoder: Decoder | None = None, num_views: int = 6):
        self.model = model
        self.denoiser = denoiser or TorchDenoiser(model, num_views)
        self.decoder = decoder or TorchDecoder(model)

    # ---- setup ------------------------------------------------------------------------------------
    def prepare(
        self,
        prompts: Sequence[str],
        cameras: CameraSet,
        height: int,
        width: int,
        guidance: float = DEFAULT_GUIDANCE,
        inv_guidance: float = 1.0,
        camera_scale: float = 1.0,
    ) -> Conditioning:
        """Encode prompts once, compute camera residuals once, tile both to B·V rows."""
        m = self.model
        v = cameras.num_views
        n = len(prompts) * v
        emb = m.encode_prompts(list(prompts)).repeat_views(v)
        cams = [r.repeat(len(prompts), 1, 1, 1) * camera_scale for r in m.camera_residuals(cameras, height, width)]
        cond = m.guidance_cond(guidance, n)
        cond_inv = m.guidance_cond(inv_guidance, n)
        if cond is None:  # a UNet without w-conditioning: the contract still carries a (unused) tensor
            cond = cond_inv = torch.zeros(n, 1, device=m.device, dtype=m.dtype)
        return Conditioning(emb.prompt_embeds, emb.text_embeds, m.time_ids(height, width, n), cond, cond_inv, cams)

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def noise(self, gens: Sequence[torch.Generator], num_views: int, h: int, w: int) -> torch.Tensor:
        """[B·V, C, h, w] float32, one draw per prompt generator (views contiguous)."""
        c = self.model.latent_channels
        return torch.cat([torch.randn((num_views, c, h, w), generator=g, dtype=torch.float32) for g in gens]).to(self.model.device)

    # ---- sampling ---------------------------------------------------------------------------------
    def _eps(self, denoiser: Denoiser, x: torch.Tensor, t: int, cond: Conditioning, inverse: bool = False) -> torch.Tensor:
        ts = torch.tensor([float(t)], device=x.device, dtype=torch.float32)
        return denoiser(x.to(self.model.dtype), ts, *cond.args(inverse)).float()

    @property
    def limits(self):
        """The house limits for this model's size multiple (a session narrows them to its engines)."""
        return HOUSE_LIMITS.narrowed(resolution_multiple=self.model.resolution_multiple,
                                     default_resolution=self.model.info.default_resolution)

    def run(self, prompts: Sequence[str], seeds: Sequence[int], spec: SampleSpec, **options) -> SampleResult:
        """Sample ``spec`` as it is (its LoRA scale is the session's business); ``options`` as :meth:`sample`'s."""
        cameras = CameraSet(azimuths=spec.azimuths, elevation=spec.elevation)
        return self.sample(prompts, seeds, steps=spec.steps, guidance=spec.guidance, cameras=cameras,
                           height=spec.height, width=spec.width, zmv=spec.zmv, zmv_steps=spec.zmv_steps, **options)

    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        cameras: CameraSet | None = None,
        height: int | None = None,
        width: int | None = None,
        zmv: bool = False,
        zmv_steps: int = 1,
        zmv_repeats: int = 1,
        inv_guidance: float = 1.0,
        record: bool = False,
        decode: bool = True,
        initial_latents: torch.Tensor | None = None,
        noise_seeds: Sequence[int] | None = None,
        conditioning: Conditioning | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> SampleResult:
        """Sample B prompts x V views.

        ``zmv`` runs ZMV-Sampling (mvczigal.md §5): at the first ``zmv_steps`` steps, ``zmv_repeats`` times,
        zag back to t with an inversion at guidance ``inv_guidance`` and zig again with fresh noise; the
        recorded state of such a step is the inverted latent. ``initial_latents`` reuses an x_T (the paired
        training rollout); ``noise_seeds`` draws the step noise from other generators than x_T's.
        """
        m = self.model
        cameras = cameras or CameraSet.default()
        height = height or m.info.default_resolution
        width = width or m.info.default_resolution
        validate_prompts(prompts)
        SampleSpec(steps=steps, guidance=guidance, azimuths=cameras.azimuths, elevation=cameras.elevation, height=height,
                   width=width, zmv=zmv, zmv_steps=zmv_steps).check(self.limits)
        if len(seeds) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(seeds)} seeds.", "Give one seed per prompt.")
        v, f = cameras.num_views, m.vae_scale_factor
        h, w = height // f, width // f
        denoiser = denoiser_for_views(self.denoiser, v)
        timings: dict[str, float] = {}
        sync = torch.cuda.synchronize if m.device.type == "cuda" else (lambda: None)

        t0 = time.perf_counter()
        with torch.no_grad():
            cond = conditioning or self.prepare(prompts, cameras, height, width, guidance, inv_guidance)
        sync()
        timings["conditioning_s"] = time.perf_counter() - t0

        schedule = LCMSchedule.create(steps)
        ac = schedule.alphas_cumprod.to(m.device)
        gens = self.generators(seeds)
        x = self.noise(gens, v, h, w) if initial_latents is None else initial_latents.float().to(m.device)
        if noise_seeds is not None:
            gens = self.generators(noise_seeds)

        states, next_states, log_probs = [], [], []
        nfe = 0
        denoised = x
        t1 = time.perf_counter()
        with torch.no_grad():
            for i, t in enumerate(schedule.timesteps):
                t_prev = schedule.prev_timestep(i)
                out = policy_step(self._eps(denoiser, x, t, cond), x, t, t_prev, ac, noise=self.noise(gens, v, h, w))
                nfe += 1
                if zmv and i < zmv_steps:
                    for _ in range(zmv_repeats):
                        # zag: query the UNet at the target t (low guidance), invert x' back to t
                        eps_inv = self._eps(denoiser, out.prev_sample, t, cond, inverse=True)
                        x = inverse_step(eps_inv, out.prev_sample, t_prev, t, ac)
                        # zig again from the inverted latent, fresh noise
                        out = policy_step(self._eps(denoiser, x, t, cond), x, t, t_prev, ac, noise=self.noise(gens, v, h, w))
                        nfe += 2
                if record:
                    states.append(x)
                    next_states.append(out.prev_sample)
                    log_probs.append(out.log_prob)
                x, denoised = out.prev_sample, out.denoised
                if on_step:
                    on_step(i + 1, steps)
        sync()
        timings["denoise_s"] = time.perf_counter() - t1

        images = None
        if decode:
            if not record:  # rollouts leave NaN to the trainer's flag, which stops every rank at the same step
                require_finite(denoised, "denoised latents")
            t2 = time.perf_counter()
            with torch.no_grad():
                images = self.decoder(denoised).float().cpu()
            sync()
            if not record:
                require_finite(images, "decoded images (VAE)", "Run the VAE in fp32 (--dtype fp32) or use the fp16-fix VAE.")
            timings["decode_s"] = time.perf_counter() - t2
            images = images.reshape(len(prompts), v, *images.shape[1:])

        traj = None
        if record:
            traj = Trajectory(
                states=torch.stack(states, dim=1),
                next_states=torch.stack(next_states, dim=1),
                log_probs=torch.stack(log_probs, dim=1),
                timesteps=list(schedule.timesteps),
                prev_timesteps=[schedule.prev_timestep(i) for i in range(len(schedule))],
            )
        return SampleResult(images=images, latents=denoised, trajectory=traj, nfe=nfe, timings=timings)


def recompute_log_probs(
    denoiser: Denoiser,
    model_dtype: torch.dtype,
    states: torch.Tensor,
    next_states: torch.Tensor,
    t: int,
    t_prev: int,
    cond: Conditioning,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Log-probs [N] of recorded actions under the current weights (float32, gradients through ε)."""
    ts = torch.tensor([float(t)], device=states.device, dtype=torch.float32)
    eps = denoiser(states.to(model_dtype), ts, *cond.args()).float()
    return policy_step(eps, states, t, t_prev, alphas_cumprod, prev_sample=next_states).log_prob


def images_to_grid(images: torch.Tensor):
    """[V, 3, H, W] in [0,1] -> one 1xV PIL image (views left to right)."""
    import numpy as np
    from PIL import Image

    v, _, hgt, wid = images.shape
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(2, 0, 3, 1).reshape(hgt, v * wid, 3)
    return Image.fromarray(np.ascontiguousarray(arr.numpy()))


def image_to_pil(image: torch.Tensor):
    return images_to_grid(image[None])
