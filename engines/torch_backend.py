"""PyTorch backends: eager, ``torch.compile`` and CUDA-graph variants of the Denoiser/Decoder contract.

Speed-ups applied by :func:`optimize_unet` (compile / CUDA-graph variants):

* fused QKV: each ``attn1`` runs one GEMM for q, k, v of the base branch and of the MV branch (6C wide),
  the multiview processor's own optional step (``MVRowAttnProcessor.fuse_projections``: one forward, the
  state-dict keys unchanged); :func:`unfuse_qkv` undoes it. Skipped when PEFT LoRA layers are attached;
* channels-last memory format for the convolutions;
* SDPA everywhere (the MV processors already use ``scaled_dot_product_attention``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engines.base import Backend
from mvz.devices import resolve_device
from mvz.errors import BackendUnavailableError
from mvz.models.attention import MVRowAttnProcessor, MVSettings
from mvz.pipeline import TorchDecoder, TorchDenoiser


def _mv_attentions(unet: nn.Module):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and isinstance(m.processor, MVRowAttnProcessor)]


def fuse_qkv(unet: nn.Module) -> int:
    """Fuse the q/k/v projections of every MV ``attn1`` (``MVRowAttnProcessor.fuse_projections``, in
    place). Returns how many; none while PEFT LoRA layers are attached (fuse the LoRA first)."""
    if getattr(unet, "peft_config", None):
        return 0
    attns = _mv_attentions(unet)
    for attn in attns:
        attn.processor.fuse_projections(attn)
    return len(attns)


def unfuse_qkv(unet: nn.Module) -> int:
    attns = [a for a in _mv_attentions(unet) if a.processor.fused_qkv is not None]
    for attn in attns:
        attn.processor.unfuse_projections(attn)
    return len(attns)


def restore_unet(unet: nn.Module) -> None:
    """Undo :func:`optimize_unet` (unfuse QKV, contiguous memory format): call before loading a LoRA or
    saving the UNet after a compile / CUDA-graph backend has used it."""
    unfuse_qkv(unet)
    unet.to(memory_format=torch.contiguous_format)


def optimize_unet(unet: nn.Module, *, qkv: bool = True, channels_last: bool = True) -> dict:
    done = {"fused_qkv_blocks": fuse_qkv(unet) if qkv else 0, "channels_last": channels_last}
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return done


Capture = Callable[[Callable[[], torch.Tensor], list[torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def cuda_graph_capture(run: Callable[[], torch.Tensor], static_in: list[torch.Tensor], warmup: int = 2
                       ) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm ``run()`` up on a side stream, capture it into a CUDA graph; returns (replay, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = run()
    return graph.replay, static_out


class CudaGraphRunner:
    """Capture ``fn(*tensors, **config)`` into a CUDA graph once per (config, input shapes/dtypes/devices) and
    replay it with the inputs copied into that capture's static buffers (fixed addresses). Returns a clone of
    the static output.

    ``config`` carries the Python values a capture bakes in (for the UNet: views, prompts, latent grid, MV
    scale), so a graph captured for one (prompts, views) split is never replayed for another with the same
    tensor shapes. ``capture`` (default :func:`cuda_graph_capture`) is injectable so the keying can be tested
    without CUDA."""

    def __init__(self, fn: Callable, warmup: int = 2, capture: Capture | None = None):
        self.fn = fn
        self.capture = capture or (lambda run, static_in: cuda_graph_capture(run, static_in, warmup))
        self.graphs: dict[tuple, tuple] = {}

    @staticmethod
    def key(tensors: tuple[torch.Tensor, ...], config: dict) -> tuple:
        return (tuple(sorted(config.items())), tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))

    def __call__(self, *tensors: torch.Tensor, **config) -> torch.Tensor:
        key = self.key(tensors, config)
        if key not in self.graphs:
            static_in = [t.detach().clone() for t in tensors]
            replay, static_out = self.capture(lambda: self.fn(*static_in, **config), static_in)
            self.graphs[key] = (replay, static_in, static_out)
        replay, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, tensors, strict=True):
            dst.copy_(src)
        replay()
        return static_out.clone()


class GraphedDenoiser(TorchDenoiser):
    """The torch Denoiser replayed from CUDA graphs, one per (multiview settings, prompts, shapes)."""

    def __init__(self, model, num_views: int, unet: Callable | None = None, channels_last: bool = True,
                 capture: Capture | None = None):
        super().__init__(model, num_views, unet, channels_last, name="torch-cudagraph")
        self._runner = CudaGraphRunner(self._forward, capture=capture)

    def _forward(self, *args, settings: MVSettings, prompts: int) -> torch.Tensor:
        return self.forward(settings, *args)

    def __call__(self, *args):
        settings = self.settings(args[0])
        return self._runner(*args, settings=settings, prompts=int(args[0].shape[0]) // self.num_views)


class VAEDecode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents):
        return self.model.decode_latents(latents)


class CallableDecoder:
    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.fn(latents)


def create_torch_backend(name: str, model, *, num_views: int, device, compile_mode: str | None = None,
                         fused_qkv: bool = True, channels_last: bool = True) -> Backend:
    if model is None:
        raise BackendUnavailableError(f"the {name} backend needs a loaded model.", "Load one with mvz.models.loading.load_model.")
    dev = resolve_device(device)
    info = {"provider": "torch", "device": str(dev), "precision": str(model.dtype).replace("torch.", "")}
    if name == "torch":
        return Backend("torch", TorchDenoiser(model, num_views), TorchDecoder(model), info)
    if name == "torch-cudagraph" and dev.type != "cuda":
        raise BackendUnavailableError("torch-cudagraph needs a CUDA device.", "Use --backend torch or torch-compile on the CPU.")
    # compile / CUDA-graph variants optimise the model's UNet in place (the backend owns it for inference)
    opts = optimize_unet(model.unet, qkv=fused_qkv, channels_last=channels_last and dev.type == "cuda")
    info.update(opts)
    if name == "torch-compile":
        mode = compile_mode or ("max-autotune-no-cudagraphs" if dev.type == "cuda" else "default")
        compiled_unet = torch.compile(model.unet, mode=mode, fullgraph=False, dynamic=False)
        compiled_vae = torch.compile(VAEDecode(model), mode=mode, dynamic=False)
        info["compile_mode"] = mode
        return Backend(name, TorchDenoiser(model, num_views, compiled_unet, opts["channels_last"], name),
                       CallableDecoder(compiled_vae, name), info)
    if name == "torch-cudagraph":
        vae = CudaGraphRunner(VAEDecode(model))
        return Backend(name, GraphedDenoiser(model, num_views, model.unet, opts["channels_last"]), CallableDecoder(vae, name), info)
    raise ValueError(name)
