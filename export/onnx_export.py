"""One module -> one clean ONNX graph: trace, clean up, fold constants, infer shapes, save, check.

Exporters (explicit, never the torch default):

* ``torchscript`` (default): ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer that NVIDIA's
  demo/Diffusion uses; fast, dynamic batch through ``dynamic_axes``.
* ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), dynamic batch through
  ``dynamic_shapes``; several times slower to export on the tiny model.

Then onnx-graphsurgeon: ``cleanup`` -> ``fold_constants`` -> ``cleanup().toposort()``, ONNX shape inference,
and a save with all weights in one external data file (``<name>.onnx.data``) when the graph is over 2 GB
(or when asked). ``onnx.checker`` runs on the saved file (the path form handles external data).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PROTOBUF_LIMIT = 2 * 1024**3
EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = 19


@dataclass
class SavedGraph:
    path: Path
    external_data: Path | None
    bytes: int
    num_nodes: int


def _initializer_bytes(model) -> int:
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else init.ByteSize()
    return total


def trace_to_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    opset: int = MIN_OPSET,
    exporter: str = "torchscript",
    dynamic_batch: bool = False,
    batch_inputs: Sequence[str] | None = None,
) -> None:
    """Raw export of ``module(*args)`` to ``path`` (external data files may appear beside it)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    batch_inputs = list(input_names if batch_inputs is None else batch_inputs)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values are expected (shapes are baked)
        if exporter == "torchscript":
            dynamic_axes = None
            if dynamic_batch:
                dynamic_axes = {n: {0: "batch"} for n in batch_inputs}
                dynamic_axes.update({n: {0: "batch"} for n in output_names})
            torch.onnx.export(
                module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                opset_version=opset, dynamo=False, do_constant_folding=True, export_params=True,
                dynamic_axes=dynamic_axes,
            )
        else:
            dynamic_shapes = None
            if dynamic_batch:
                rows = torch.export.Dim("batch", min=1, max=1024)
                dynamic_shapes = tuple({0: rows} if n in batch_inputs else None for n in input_names)
            program = torch.onnx.export(
                module, args, input_names=list(input_names), output_names=list(output_names),
                opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True,
            )
            program.save(str(path), external_data=True)


def clean_graph(model, fold_constants: bool = True):
    """onnx-graphsurgeon clean-up and constant folding (ORT-backed; failures to fold are left in place)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup()
    if fold_constants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph.fold_constants(error_ok=True)
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)


def save_graph(model, path: Path, external_data: bool | None = None) -> SavedGraph:
    """Shape inference, save (external data above 2 GB or when asked), ``onnx.checker`` on the file."""
    import onnx

    size = _initializer_bytes(model)
    use_external = size > PROTOBUF_LIMIT - (64 << 20) if external_data is None else external_data
    data_name = f"{path.name}.data"
    if not use_external:
        model = onnx.shape_inference.infer_shapes(model)
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    onnx.checker.check_model(str(path), full_check=False)
    data = path.parent / data_name if use_external else None
    total = path.stat().st_size + (data.stat().st_size if data else 0)
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    return SavedGraph(path, data, total, nodes)


def export_graph(
    module: torch.nn.Module,
    args: tuple,
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    fold_constants: bool = True,
    external_data: bool | None = None,
    **trace_options,
) -> SavedGraph:
    """Trace ``module`` into a clean, checked ``path`` (its folder must exist; the raw export is staged in
    a temp folder beside it and removed). ``trace_options`` go to :func:`trace_to_onnx` (``opset``,
    ``exporter``, ``dynamic_batch``, ``batch_inputs``)."""
    import onnx

    path = Path(path)
    raw_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.raw.", dir=path.parent))
    try:
        raw = raw_dir / path.name
        trace_to_onnx(module, args, raw, input_names, output_names, **trace_options)
        model = onnx.load(str(raw), load_external_data=True)
        model = clean_graph(model, fold_constants=fold_constants)
        return save_graph(model, path, external_data=external_data)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)


def graph_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """[{name, shape, dtype}] for the graph inputs and outputs (symbolic dims as strings)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))}

    inits = {i.name for i in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def float_initializer_dtypes(path: str | Path) -> dict[str, int]:
    """Count of floating initializers by numpy dtype name (structural precision check)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        name = str(helper.tensor_dtype_to_np_dtype(init.data_type))
        if name.startswith("float") or name == "bfloat16":
            counts[name] = counts.get(name, 0) + 1
    return counts
