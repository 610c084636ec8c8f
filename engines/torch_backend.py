"""PyTorch backends: eager, ``torch.compile`` and CUDA-graph variants of the Denoiser/Decoder contract.

Speed-ups applied by :func:`optimize_unet` (compile / CUDA-graph variants):

* fused QKV: each ``attn1`` runs one GEMM for q, k, v of the base branch and of the MV branch (6C wide);
  the original ``to_q``/``to_k``/... weights become views into the fused weight (no extra memory). While
  fused, the processors' state-dict keys change (``processor.qkv.weight``, ``processor.original.*``);
  :func:`unfuse_qkv` restores them. Skipped when PEFT LoRA layers are attached (fuse the LoRA first);
* channels-last memory format for the convolutions;
* SDPA everywhere (the MV processors already use ``scaled_dot_product_attention``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engines.base import Backend
from mvz.devices import resolve_device
from mvz.errors import BackendUnavailableError
from mvz.models.attention import (
    MVRowAttnProcessor,
    MVSettings,
    ProcessorModule,
    _heads_merge,
    _heads_split,
    mv_grid,
    row_multiview_attention,
)
from mvz.pipeline import TorchDecoder, TorchDenoiser


class FusedQKVMVProcessor(ProcessorModule):
    """``MVRowAttnProcessor`` with one fused projection for q, k, v (+ the MV branch's q, k, v)."""

    def __init__(self, attn, original: MVRowAttnProcessor):
        super().__init__()
        self.original = original  # to restore with unfuse_qkv
        self.heads = original.heads
        self.to_out_mv = original.to_out_mv
        linears = [attn.to_q, attn.to_k, attn.to_v, original.to_q_mv, original.to_k_mv, original.to_v_mv]
        c = attn.to_q.in_features
        weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
        self.qkv = nn.Linear(c, weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        self.qkv.weight = nn.Parameter(weight, requires_grad=False)
        for i, lin in enumerate(linears):  # share storage: no second copy of the weights
            lin.weight = nn.Parameter(self.qkv.weight.data[i * c:(i + 1) * c], requires_grad=False)
        self.has_bias = [lin.bias is not None for lin in linears]
        self.biases = [lin.bias for lin in linears]

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                num_views=None, latent_size=None, mv_scale=1.0):
        residual = hidden_states
        proj = self.qkv(hidden_states)
        parts = list(proj.chunk(6, dim=-1))
        for i, b in enumerate(self.biases):
            if b is not None:
                parts[i] = parts[i] + b
        q, k, v, qm, km, vm = parts
        q, k, v = _heads_split(q, attn.heads), _heads_split(k, attn.heads), _heads_split(v, attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = attn.to_out[1](attn.to_out[0](_heads_merge(F.scaled_dot_product_attention(q, k, v)).to(q.dtype)))
        if mv_scale != 0.0:
            h, w = mv_grid(hidden_states, num_views, latent_size)
            mv = row_multiview_attention(qm, km, vm, self.heads, int(num_views), h, w)
            out = out + mv_scale * self.to_out_mv[1](self.to_out_mv[0](mv))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def fuse_qkv(unet: nn.Module) -> int:
    """Install :class:`FusedQKVMVProcessor` on every MV ``attn1`` (in place). Returns how many."""
    from diffusers.models.attention_processor import Attention

    if getattr(unet, "peft_config", None):
        return 0
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, MVRowAttnProcessor):
            module.processor = FusedQKVMVProcessor(module, module.processor)
            count += 1
    return count


def unfuse_qkv(unet: nn.Module) -> int:
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, FusedQKVMVProcessor):
            module.processor = module.processor.original
            count += 1
    return count


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
