"""One module -> one clean ONNX graph, with the weights touched once after the trace.

Exporters (explicit, never the torch default):

* ``dynamo`` (default): a trace that does not compute. The module's weights are set aside and the module and
  its example inputs are moved to the ``meta`` device; ``torch.onnx.export(..., dynamo=True, optimize=False)``
  records the graph from shapes alone (seconds, no activations, whatever the device or precision), then the
  real weights are applied to the program (the model's own tensors: no copy), onnxscript's optimizer cleans
  and folds it (fused LayerNormalization, plain MatMul/Softmax/MatMul attention), and it is saved tensor by
  tensor (all weights in one ``<name>.onnx.data`` above 2 GB, or when asked).
* ``torchscript``: ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer NVIDIA's demo/Diffusion
  uses (it runs the module; ModelOpt's Q/DQ export needs it). Then onnx-graphsurgeon ``cleanup`` ->
  ``fold_constants`` -> ``cleanup().toposort()`` in memory for a graph under 2 GB; above that the graph is
  cleaned on its structure only (weights stay on disk) and its per-tensor external files are gathered into
  one data file, one tensor at a time.

After a file is written nothing loads its weights: ONNX shape inference runs on the path
(``infer_shapes_path``), ``onnx.checker`` on the path, and the node count and graph I/O on the structure
(``onnx.load(..., load_external_data=False)``).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from export import EXPORTERS  # one list, torch-free in export/__init__ (the CLI checks it early)

PROTOBUF_LIMIT = 2 * 1024**3
EXTERNAL_ABOVE = PROTOBUF_LIMIT - (64 << 20)  # weight bytes above which a graph keeps them in a data file

DEFAULT_EXPORTER = "dynamo"
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


@contextmanager
def weights_on_meta(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Swap every parameter and buffer of ``module`` for a ``meta`` tensor of the same shape and dtype for the
    duration of the block; yield the real tensors by qualified name (the model's own, not copies); put the
    very same tensors back afterwards, even on error."""
    state = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for key, value in table.items():
                    if value is None or value.device.type == "meta":
                        continue
                    swapped.append((table, key, value))
                    meta = torch.empty_like(value, device="meta")
                    table[key] = torch.nn.Parameter(meta, requires_grad=False) if table is sub._parameters else meta
        yield state
    finally:
        for table, key, value in reversed(swapped):
            table[key] = value


def _weight_bytes(state: dict[str, torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in state.values():  # tied weights count once
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _dynamo_trace(module, args, path: Path, input_names, output_names, opset, dynamic_batch, batch_inputs,
                  external_data: bool | None) -> None:
    """The trace that does not compute: meta module and inputs -> program -> real weights -> optimize -> save."""
    dynamic_shapes = None
    if dynamic_batch:
        rows = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = tuple({0: rows} if n in batch_inputs else None for n in input_names)
    # torch.onnx reports progress on stdout, which belongs to the CLI (``--json``)
    with weights_on_meta(module) as state, torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            module, tuple(a.to("meta") for a in args), input_names=list(input_names),
            output_names=list(output_names), opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes,
            optimize=False,  # the optimizer would fold meta tensors; it runs once the weights are real
        )
    program.apply_weights(state)
    on_meta = [v.name for v in program.model.graph.initializers.values()
               if isinstance(getattr(v.const_value, "raw", None), torch.Tensor) and v.const_value.raw.is_meta]
    if on_meta:  # a tensor the state dict does not carry (a non-persistent buffer) would be exported empty
        raise RuntimeError(f"the dynamo trace left {len(on_meta)} weights without values (e.g. {on_meta[0]}); "
                           "export this module with exporter='torchscript'")
    program.optimize()
    big = _weight_bytes(state) > EXTERNAL_ABOVE
    program.save(str(path), external_data=big if external_data is None else external_data)


def trace_to_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    opset: int = MIN_OPSET,
    exporter: str = DEFAULT_EXPORTER,
    dynamic_batch: bool = False,
    batch_inputs: Sequence[str] | None = None,
    external_data: bool | None = None,
) -> None:
    """Export of ``module(*args)`` to ``path`` (external data may appear beside it). ``dynamo`` writes the
    finished graph (optimized; weights in ``<name>.data`` when big or ``external_data``); ``torchscript``
    writes the raw trace, which :func:`finish_traced` cleans."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    batch_inputs = list(input_names if batch_inputs is None else batch_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values are expected (shapes are baked)
        if exporter == "dynamo":
            _dynamo_trace(module, args, path, input_names, output_names, opset, dynamic_batch, batch_inputs,
                          external_data)
            return
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {n: {0: "batch"} for n in batch_inputs}
            dynamic_axes.update({n: {0: "batch"} for n in output_names})
        with torch.inference_mode():
            torch.onnx.export(
                module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                opset_version=opset, dynamo=False, do_constant_folding=True, export_params=True,
                dynamic_axes=dynamic_axes,
            )


def clean_graph(model, fold_constants: bool = True):
    """onnx-graphsurgeon clean-up and constant folding (ORT-backed; failures to fold are left in place).
    Tensors kept in external data stay there (graphsurgeon carries their protos unread) as long as
    ``fold_constants`` is off."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup()
    if fold_constants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph.fold_constants(error_ok=True)
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)


def has_external_data(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def gather_external_data(model, source_dir: Path, data_path: Path) -> None:
    """Copy every external tensor of ``model`` (a structure loaded without its data, files under
    ``source_dir``) into the one file ``data_path``, one tensor at a time, and point the tensors at it."""
    from onnx.external_data_helper import ExternalDataInfo, set_external_data, uses_external_data

    offset = 0
    with open(data_path, "wb") as out:
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            with open(source_dir / info.location, "rb") as src:
                src.seek(info.offset or 0)
                blob = src.read(info.length) if info.length else src.read()
            pad = -offset % 4096  # page-aligned, as onnx's own writer does
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del tensor.external_data[:]
            set_external_data(tensor, data_path.name, offset, len(blob))
            offset += len(blob)
            del blob


def _checked(path: Path, data: Path | None) -> SavedGraph:
    """Shape inference and ``onnx.checker`` on the file, the node count from the structure: no weights read."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    onnx.checker.check_model(str(path), full_check=False)
    total = path.stat().st_size + (data.stat().st_size if data else 0)
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    return SavedGraph(path, data, total, nodes)


def save_graph(model, path: Path, external_data: bool | None = None) -> SavedGraph:
    """Save an in-memory graph (external data above 2 GB or when asked), then check it on its path."""
    import onnx

    size = _initializer_bytes(model)
    use_external = size > EXTERNAL_ABOVE if external_data is None else external_data
    data = path.parent / f"{path.name}.data" if use_external else None
    if data is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    return _checked(path, data)


def finish_traced(raw: Path, path: Path, *, fold_constants: bool = True, external_data: bool | None = None) -> SavedGraph:
    """A raw TorchScript trace -> the clean, checked ``path``. A graph whose weights the tracer already put
    in external files is cleaned on its structure (no folding: that would read weights) and its files are
    gathered into ``<name>.data``; a smaller one is cleaned and folded in memory."""
    import onnx

    model = onnx.load(str(raw), load_external_data=False)
    if not has_external_data(model):
        model = onnx.load(str(raw))
        return save_graph(clean_graph(model, fold_constants=fold_constants), path, external_data=external_data)
    model = clean_graph(model, fold_constants=False)
    data = path.parent / f"{path.name}.data"
    gather_external_data(model, raw.parent, data)
    onnx.save_model(model, str(path))
    return _checked(path, data)


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
    """Trace ``module`` into a clean, checked ``path`` (its folder must exist; a TorchScript trace is staged
    in a temp folder beside it and removed). ``trace_options`` go to :func:`trace_to_onnx` (``opset``,
    ``exporter``, ``dynamic_batch``, ``batch_inputs``)."""
    path = Path(path)
    if trace_options.get("exporter", DEFAULT_EXPORTER) == "dynamo":
        trace_to_onnx(module, args, path, input_names, output_names, external_data=external_data, **trace_options)
        data = path.parent / f"{path.name}.data"
        return _checked(path, data if data.is_file() else None)
    raw_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.raw.", dir=path.parent))
    try:
        raw = raw_dir / path.name
        trace_to_onnx(module, args, raw, input_names, output_names, **trace_options)
        return finish_traced(raw, path, fold_constants=fold_constants, external_data=external_data)
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
