"""Model (+ LoRA) -> an export folder: fused UNet and VAE decoder graphs, refit map, manifest, parity.

    OUT/
      mvz_export.json      manifest (I/O specs, hashes, precision, opset, versions, parity figures)
      unet.onnx            (+ unet.onnx.data above 2 GB)
      vae_decoder.onnx
      text_encoder.onnx, text_encoder_2.onnx   (optional stage)
      refit_map.json       LoRA-target weight -> ONNX initializer (TensorRT refit)
      engines/             TensorRT plans, written later by ``engines.tensorrt``

The folder is assembled under a temp name and renamed into place when complete, so a killed or failed
export (parity failure, disk full) never leaves graphs under OUT that look finished.
"""

from __future__ import annotations

import copy
import errno
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mvz.artifacts.manifest import (
    MANIFEST_NAME,
    ExportManifest,
    GraphEntry,
    TensorSpec,
    check_request,
    library_versions,
    lora_identity,
    model_fingerprint,
    now_iso,
    read_manifest,
    sha256_file,
)
from mvz.errors import InputError, ManifestMismatchError, MvzError

PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
QUANTIZED = ("int8", "fp8")  # ModelOpt Q/DQ UNet (export/quantize.py) over an fp16 (GPU) / fp32 (CPU) base
StageCallback = Callable[[str, str, dict], None]  # (stage, "start" | "done" | "skip", info)


@dataclass
class ExportResult:
    folder: Path
    manifest: ExportManifest
    reused: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def vae_fp16_safe(model) -> bool:
    """fp16 VAE only with the fp16-fix weights, read from the VAE config's ``force_upcast`` (false there; the
    stock SDXL VAE says true and overflows to NaN in fp16), never from the file path."""
    from mvz.models.multiview import vae_fp16_safe as config_says_fp16_safe

    return config_says_fp16_safe(model.vae.config)


def vae_rows_for(rows: int, vae_views: int | None) -> int:
    """Views per VAE decoder call: ``vae_views`` (default DEFAULT_VAE_VIEWS_PER_CALL), at most all ``rows``."""
    from mvz.pipeline import DEFAULT_VAE_VIEWS_PER_CALL

    if vae_views is not None and vae_views < 1:
        raise InputError(f"VAE views per call must be at least 1, got {vae_views}.")
    return min(rows, vae_views or DEFAULT_VAE_VIEWS_PER_CALL)


def vae_rows_of(manifest: ExportManifest) -> int | str:
    """The VAE decoder graph's rows per call as exported (a name for a dynamic batch axis)."""
    return manifest.graphs["vae_decoder"].inputs[0].shape[0]


def _stage(cb: StageCallback | None, name: str, event: str, **info) -> None:
    if cb is not None:
        cb(name, event, info)


def _validate(model, num_views, height, width, batch, precision, vae_precision, opset, exporter) -> None:
    from export.onnx_export import EXPORTERS, MIN_OPSET
    from mvz.pipeline import validate_request

    if precision not in (*PRECISIONS, *QUANTIZED):
        raise InputError(f"--precision must be fp16, fp32, int8 or fp8, got {precision!r}.")
    if vae_precision not in (None, *PRECISIONS):
        raise InputError(f"VAE precision must be fp16 or fp32, got {vae_precision!r}.")
    if batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}.")
    if opset < MIN_OPSET:
        raise InputError(f"--opset must be {MIN_OPSET} or newer, got {opset}.")
    if exporter not in EXPORTERS:
        raise InputError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}.")
    validate_request(["x"], 1, num_views, height, width, model.resolution_multiple)


def _folder_state(out: Path, request: dict[str, Any], force: bool) -> ExportManifest | None:
    """The existing manifest if OUT already holds exactly this export; refuse foreign content unless force."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"--out {out} is a file.", "Pass a folder path.")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return None
    if not (out / MANIFEST_NAME).is_file():
        if force:
            return None
        raise InputError(f"--out {out} is not empty and holds no mvz export.", "Pick an empty folder, or pass --force to replace it.")
    try:
        have = read_manifest(out)
        check_request(have, folder=out, **{k: v for k, v in request.items() if not k.startswith("_")})
        if have.dynamic_batch != request.get("_dynamic") or have.opset != request.get("_opset") \
                or have.vae_precision != request.get("_vae_precision") or have.exporter != request.get("_exporter") \
                or have.batch != request.get("batch") \
                or (not have.dynamic_batch and vae_rows_of(have) != request.get("_vae_rows")) \
                or _calibration_key(have.quantization) != request.get("_calibration"):  # a dynamic export serves any batch
            raise ManifestMismatchError("export options differ (batch, dynamic batch, opset, exporter, VAE precision, "
                                        "VAE views per call or calibration).")
    except MvzError as err:
        if force:
            return None
        raise InputError(
            f"--out {out} already holds another export ({err.what})", "Pick another folder, or pass --force to replace it."
        ) from None
    return None if force else have


def export_model(
    model,
    out: str | Path,
    *,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    num_views: int = 6,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    precision: str = "fp16",
    vae_precision: str | None = None,
    opset: int = 19,
    exporter: str | None = None,
    dynamic_batch: bool = False,
    parity: bool = True,
    text_encoders: bool = False,
    external_data: bool | None = None,
    force: bool = False,
    on_stage: StageCallback | None = None,
    vae_views: int | None = None,
    offload: bool = False,
    calib_prompts: str | Path | None = None,
    calib_steps: int | None = None,
) -> ExportResult:
    """Export ``model`` (a loaded MultiviewModel, left unchanged) with an optional LoRA fused in.

    ``precision`` is the UNet's; the VAE follows it when fp16 is safe for its weights (fp16-fix), else fp32
    (override with ``vae_precision``). The VAE decoder takes ``vae_views`` views per call (default
    ``mvz.pipeline.DEFAULT_VAE_VIEWS_PER_CALL``, at most batch x views): the decoder backends decode in chunks of
    that many, which bounds the VAE's activation memory. ``int8``/``fp8`` quantize the UNet with ModelOpt
    (``export.quantize``: calibrated by the sampler over ``calib_prompts`` for ``calib_steps``, cached) over an
    fp16 (CUDA) or fp32 (CPU) base. Static shapes unless ``dynamic_batch``. ``exporter`` (default: ``dynamo``, the
    trace that does not compute; ``torchscript`` for quantized graphs) picks ``export.onnx_export``'s route. Returns the folder and its
    manifest; ``reused`` when OUT already held exactly this export (nothing rewritten; ``force`` redoes it).

    Memory: a LoRA file is fused into the model's own UNet weights in place and restored bit for bit
    afterwards (no second UNet on the device). ``offload`` (the CLI, which owns the model) moves each torch
    module to the CPU and frees the device cache once its graph is traced, before ONNX Runtime parity, so
    the graph and the torch module are never both on the GPU, and the GPU is free for engine builds; the
    model is left on the CPU. After the trace the weights are touched once: each graph is written tensor by
    tensor and then checked, hashed and mapped for refit on its structure, one tensor at a time.
    """
    from export.onnx_export import DEFAULT_EXPORTER
    from export.refit_map import REFIT_MAP_NAME
    from mvz.atomic import atomic_dir

    out = Path(out).expanduser()
    height = height or model.info.default_resolution
    width = width or height
    exporter = exporter or ("torchscript" if precision in QUANTIZED else DEFAULT_EXPORTER)
    _validate(model, num_views, height, width, batch, precision, vae_precision, opset, exporter)
    if lora is not None and model.info.lora:
        raise InputError("the model already carries a LoRA and another one was given.", "Load the model without --lora, or export without it.")
    quant = _quant_spec(model, precision, num_views, height, width, calib_prompts, calib_steps) \
        if precision in QUANTIZED else None
    base = quant.base_dtype if quant else precision
    if vae_precision is None:
        vae_precision = "fp16" if base == "fp16" and vae_fp16_safe(model) else "fp32"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    _stage(on_stage, "hash", "start")
    lora_id = lora_identity(lora, lora_scale) if lora is not None else (
        lora_identity(model.info.lora, model.info.lora_scale) if model.info.lora else None)
    fingerprint = model_fingerprint(model)
    vae_rows = vae_rows_for(batch * num_views, vae_views)
    request = {"model_fp": fingerprint, "lora": lora_id, "num_views": num_views, "height": height, "width": width,
               "batch": batch, "precision": precision, "_dynamic": dynamic_batch, "_opset": opset,
               "_vae_precision": vae_precision, "_exporter": exporter, "_vae_rows": vae_rows,
               "_calibration": _calibration_key(quant and {"calibration_prompts_sha256": _prompts_sha(quant), "calibration": {"steps": quant.steps}})}
    timings["hash_s"] = time.perf_counter() - t
    _stage(on_stage, "hash", "done", seconds=timings["hash_s"])
    existing = _folder_state(out, request, force)
    if existing is not None:
        _stage(on_stage, "export", "skip", reason=f"{out} already holds this export (use --force to redo it)")
        return ExportResult(out, existing, reused=True, timings=timings)

    graphs: dict[str, GraphEntry] = {}
    try:
        with atomic_dir(out) as tmp:
            opts = GraphExport(tmp, opset, exporter, dynamic_batch, external_data, parity, model.device, offload, on_stage)
            quantization = _export_unet(model, opts, graphs, timings, lora=lora, lora_scale=lora_scale, quant=quant,
                                        precision=(precision, base),
                                        shape=(batch * num_views, num_views, height, width),
                                        ids={"model_fp": fingerprint, "lora": lora_id, "calib": calib_prompts})
            _export_vae(model, opts, graphs, timings, PRECISIONS[vae_precision], vae_rows, height, width)
            if text_encoders:
                _export_text_encoders(model, opts, graphs, timings, batch)
            manifest = ExportManifest(
                model={"name": model.info.name, "fingerprint": fingerprint, "sources": dict(model.info.sources),
                       "random_weights": bool(model.info.random_weights)},
                lora=lora_id, num_views=num_views, height=height, width=width, batch=batch,
                dynamic_batch=dynamic_batch, precision=precision, vae_precision=vae_precision, opset=opset,
                exporter=exporter, graphs=graphs, versions=library_versions(),
                refit_map=None if quant else REFIT_MAP_NAME, created=now_iso(), quantization=quantization,
            )
            manifest.save(tmp)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MvzError(
                f"out of disk space while exporting to {out}; nothing was written there.",
                "Free space (the SDXL UNet needs about 6 GB in fp16, 12 GB in fp32) and run again.",
            ) from None
        raise
    return ExportResult(out, manifest, reused=False, timings=timings)


def _export_unet(model, opts: GraphExport, graphs: dict, timings: dict, *, lora, lora_scale: float, quant,
                 precision: tuple[str, str], shape: tuple[int, int, int, int], ids: dict) -> dict | None:
    """Fuse the LoRA, (calibrate and quantize,) export the UNet and, for an unquantized one, its refit map.
    Returns the quantization record (None when not quantized). ``precision``: (the graph's, its torch base)."""
    from export.wrappers import UNET_INPUTS, UNET_OUTPUTS, UNetWrapper, unet_example_inputs

    rows, views, height, width = shape
    precision, base = precision
    unet_dtype = PRECISIONS[base]
    f = model.vae_scale_factor
    t = time.perf_counter()
    _stage(opts.on_stage, "fuse", "start", lora=str(lora or model.info.lora or ""))
    quantization, export_fn = None, None
    # quantization modifies the UNet in place, so it always works on a (fused) copy
    with _unet_to_export(model, lora, lora_scale, unet_dtype, copy=quant is not None) as unet:
        timings["fuse_s"] = time.perf_counter() - t
        _stage(opts.on_stage, "fuse", "done", seconds=timings["fuse_s"])
        if quant is not None:  # the LoRA is fused first: ModelOpt calibrates the weights that ship
            from export.quantize import calibrated_unet, export_quantized_graph, quantization_record

            t = time.perf_counter()
            calib = calibrated_unet(model, unet, quant, model_fp=ids["model_fp"], lora=ids["lora"], on_stage=opts.on_stage)
            unet = calib.unet
            quantization = quantization_record(precision, quant, calib, str(ids["calib"]) if ids["calib"] else None)
            timings["calibrate_s"] = time.perf_counter() - t
            export_fn = export_quantized_graph(precision)
        wrapper = UNetWrapper(unet, views, height // f, width // f).eval()
        args = unet_example_inputs(model, unet_dtype, rows, height, width, device=model.device)
        graphs["unet"] = _export_one(opts, "unet", wrapper, args, (UNET_INPUTS, UNET_OUTPUTS), precision,
                                     [n for n in UNET_INPUTS if n != "timestep"], timings, export_fn)
        del wrapper, args
        if quant is None:  # a quantized engine is never refit (a new LoRA needs a new calibration)
            _write_refit_map(opts, unet, timings)
    return quantization


def _write_refit_map(opts: GraphExport, unet, timings: dict) -> None:
    from export.refit_map import REFIT_MAP_NAME, build_refit_map
    from mvz.atomic import write_json

    t = time.perf_counter()
    _stage(opts.on_stage, "refit map", "start")
    refit = build_refit_map(opts.folder / "unet.onnx", unet)
    write_json(opts.folder / REFIT_MAP_NAME, refit)
    timings["refit_map_s"] = time.perf_counter() - t
    _stage(opts.on_stage, "refit map", "done", mapped=len(refit["weights"]), unmapped=len(refit["unmapped"]),
           shared=len(refit["shared"]), seconds=timings["refit_map_s"])


def _export_vae(model, opts: GraphExport, graphs: dict, timings: dict, vae_dtype: torch.dtype, vae_rows: int,
                height: int, width: int) -> None:
    from export.wrappers import VAE_INPUTS, VAE_OUTPUTS, VAEDecoderWrapper, vae_example_inputs

    vae = model.vae
    if next(vae.parameters()).dtype != vae_dtype:
        vae = copy.deepcopy(model.vae).to(vae_dtype)
    vwrap = VAEDecoderWrapper(vae).eval()
    vargs = vae_example_inputs(model, vae_dtype, vae_rows, height, width, device=model.device)
    precision = "fp16" if vae_dtype == torch.float16 else "fp32"
    graphs["vae_decoder"] = _export_one(opts, "vae_decoder", vwrap, vargs, (VAE_INPUTS, VAE_OUTPUTS), precision,
                                        list(VAE_INPUTS), timings)


def _export_text_encoders(model, opts: GraphExport, graphs: dict, timings: dict, batch: int) -> None:
    from export.wrappers import TextEncoderWrapper

    for name, enc in (("text_encoder", model.text_encoder), ("text_encoder_2", model.text_encoder_2)):
        tw = TextEncoderWrapper(enc).eval()
        ids = torch.randint(0, int(enc.config.vocab_size), (batch, 77), generator=torch.Generator("cpu").manual_seed(3))
        outs = ("hidden_states", "text_embeds") if tw.with_projection else ("hidden_states",)
        te_prec = "fp16" if next(enc.parameters()).dtype == torch.float16 else "fp32"
        graphs[name] = _export_one(opts, name, _FirstOutput(tw), (ids.to(model.device),), (("input_ids",), outs),
                                   te_prec, ["input_ids"], timings, full_module=tw)


def _quant_spec(model, precision, num_views, height, width, calib_prompts, calib_steps):
    """The calibration recipe of a quantized export, checked before anything is written."""
    from export.quantize import DEFAULT_CALIB_STEPS, CalibrationSpec, load_calib_prompts

    base = "fp16" if torch.device(model.device).type == "cuda" else "fp32"
    spec = CalibrationSpec(precision, load_calib_prompts(calib_prompts), calib_steps or DEFAULT_CALIB_STEPS,
                           num_views=num_views, height=height, width=width, base_dtype=base)
    spec.validate()
    return spec


def _prompts_sha(spec) -> str:
    from export.quantize import prompts_hash

    return prompts_hash(spec.prompts)


def _calibration_key(quantization: dict | None) -> tuple | None:
    """What decides whether an existing quantized export is this one: its calibration prompts and steps."""
    if not quantization:
        return None
    return quantization.get("calibration_prompts_sha256"), (quantization.get("calibration") or {}).get("steps")


class _FirstOutput(torch.nn.Module):
    """Parity helper: the first output of a multi-output module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)[0]


@contextmanager
def _unet_to_export(model, lora, lora_scale: float, dtype: torch.dtype, copy: bool = False) -> Iterator[torch.nn.Module]:
    """The UNet to trace: the model's own, with a LoRA file fused in place (restored exactly afterwards);
    a copy only for a UNet that carries PEFT layers, is in another dtype than the export's, or when ``copy``."""
    from export.fuse import fused_unet, lora_fused_in_place

    if copy or bool(getattr(model.unet, "peft_config", None)) or model.dtype != dtype:
        yield fused_unet(model.unet, lora, lora_scale, dtype=dtype)
    elif lora is not None:
        with lora_fused_in_place(model.unet, lora, lora_scale) as unet:
            yield unet
    else:
        yield model.unet


def _release(module: torch.nn.Module) -> None:
    """Move a traced torch module off the GPU and return the freed blocks (before ORT parity, engine builds)."""
    import gc

    if any(p.is_cuda for p in module.parameters()):
        module.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class GraphExport:
    """How every graph of one export is written and checked (the options that do not change per graph)."""

    folder: Path
    opset: int
    exporter: str
    dynamic_batch: bool
    external_data: bool | None
    parity: bool
    device: torch.device
    offload: bool = False
    on_stage: StageCallback | None = None


def _export_one(opts: GraphExport, name: str, module, args, io: tuple[Sequence[str], Sequence[str]], precision: str,
                batch_inputs: Sequence[str], timings: dict[str, float], export_fn: Callable | None = None,
                full_module=None) -> GraphEntry:
    """Trace one graph into ``opts.folder`` (``export_fn``: ``onnx_export.export_graph`` or the quantized
    one), release the torch module when asked, check parity, and describe the files for the manifest."""
    from export.onnx_export import export_graph, graph_io
    from export.parity import check_graph_parity

    input_names, output_names = io
    path = opts.folder / f"{name}.onnx"
    reference = None
    if opts.parity:  # the torch side of parity first, so the module can leave the GPU before ONNX Runtime loads
        with torch.inference_mode():
            reference = module(*args).detach().float().cpu().numpy()
    t = time.perf_counter()
    _stage(opts.on_stage, f"{name}: export", "start", precision=precision, opset=opts.opset, exporter=opts.exporter)
    saved = (export_fn or export_graph)(
        full_module or module, args, path, input_names, output_names, opset=opts.opset, exporter=opts.exporter,
        dynamic_batch=opts.dynamic_batch, batch_inputs=list(batch_inputs), external_data=opts.external_data)
    timings[f"{name}_export_s"] = time.perf_counter() - t
    _stage(opts.on_stage, f"{name}: export", "done", bytes=saved.bytes, nodes=saved.num_nodes,
           seconds=timings[f"{name}_export_s"])
    if opts.offload:
        _release(full_module or module)
    figures: dict[str, Any] = {"status": "skipped", "reason": "parity check disabled"}
    if opts.parity:
        t = time.perf_counter()
        _stage(opts.on_stage, f"{name}: parity", "start")
        figures = check_graph_parity(path, module, args, input_names, precision, providers=_parity_providers(opts.device),
                                     label=name, reference=reference)
        timings[f"{name}_parity_s"] = time.perf_counter() - t
        _stage(opts.on_stage, f"{name}: parity", "done", seconds=timings[f"{name}_parity_s"], **figures)
    inputs, outputs = graph_io(path)
    data = saved.external_data
    return GraphEntry(
        file=path.name, external_data=data.name if data else None,
        sha256=sha256_file(path), bytes=saved.bytes, inputs=[TensorSpec(**i) for i in inputs],
        outputs=[TensorSpec(**o) for o in outputs], precision=precision, parity=figures,
        external_data_sha256=sha256_file(data) if data else None,
    )


def _parity_providers(device) -> list[str] | None:
    """ONNX Runtime providers for parity on ``device``: CUDA first where it exists, else ORT's default."""
    if torch.device(device).type != "cuda":
        return None
    import onnxruntime as ort

    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
