"""The graph I/O specs (``mvz.artifacts.graphs``) describe the graphs the exporter really writes: the names,
shapes and dtypes read back from the ONNX files with ``onnx``, the engine profiles of the export manifest,
at two sizes (one square fp32, one non-square fp16 with two prompts), on the tiny model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mvz.artifacts.graphs import IOShape, UNetIO, VAEDecoderIO, engine_profile  # noqa: E402

VIEWS = 2
# (height, width, prompts, precision): the tiny model's sides are multiples of 32
SIZES = [(32, 32, 1, "fp32"), (64, 32, 2, "fp16")]


def onnx_io(path) -> tuple[list[tuple], list[tuple]]:
    """[(name, shape, numpy dtype name)] of a graph's inputs and outputs, as the ONNX file declares them."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def spec(v):
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        return v.name, dims, str(helper.tensor_dtype_to_np_dtype(t.elem_type))

    return [spec(v) for v in graph.input if v.name not in inits], [spec(v) for v in graph.output]


def as_tuples(tensors) -> list[tuple]:
    return [(t.name, t.shape, t.dtype) for t in tensors]


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[1]}x{s[0]}-b{s[2]}-{s[3]}")
def exported(request, tiny_model, tmp_path_factory):
    from export.exporter import export_model

    height, width, prompts, precision = request.param
    out = tmp_path_factory.mktemp("graphs") / "export"
    res = export_model(tiny_model, out, num_views=VIEWS, height=height, width=width, batch=prompts,
                       precision=precision, parity=False)
    return res, IOShape.of(prompts, VIEWS, height, width)


def test_unet_spec_matches_the_exported_onnx(exported, tiny_model):
    res, shape = exported
    entry = res.manifest.graphs["unet"]
    spec = UNetIO.of(tiny_model)
    dtype = {"fp32": "float32", "fp16": "float16"}[entry.precision]
    inputs, outputs = onnx_io(res.folder / entry.file)
    # the exporter may prune an input the graph does not read; every one it keeps is the spec's, in order
    want = [t for t in as_tuples(spec.inputs(shape, dtype)) if t[0] in {i[0] for i in inputs}]
    assert inputs == want and len(inputs) >= len(spec.input_names) - 1
    assert outputs == as_tuples(spec.outputs(shape, dtype))


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 32), (96, 64)])
def test_unet_spec_camera_inputs_are_the_camera_adapters_outputs(tiny_model, height, width):
    """The exporter traces with the spec's sample inputs, so the ONNX alone cannot catch a wrong camera
    shape (a residual of the wrong grid broadcasts): the spec must give what the adapter really outputs."""
    from mvz.models.cameras import CameraSet

    spec = UNetIO.of(tiny_model)
    cams = {t.name: t.shape for t in spec.inputs(IOShape.of(1, VIEWS, height, width), "float32") if t.name.startswith("cam_")}
    real = tiny_model.camera_residuals(CameraSet.default(), height, width)  # [V_default, C, h, w] each
    assert list(cams.values()) == [(VIEWS, *r.shape[1:]) for r in real]


def test_vae_decoder_spec_matches_the_exported_onnx(exported, tiny_model):
    res, shape = exported
    entry = res.manifest.graphs["vae_decoder"]
    inputs, outputs = onnx_io(res.folder / entry.file)
    rows = inputs[0][1][0]  # the decoder takes a chunk of views per call (the exporter's choice)
    assert rows <= shape.rows
    chunk = IOShape(rows, shape.height, shape.width)
    spec = VAEDecoderIO.of(tiny_model)
    dtype = {"fp32": "float32", "fp16": "float16"}[entry.precision]
    assert inputs == as_tuples(spec.inputs(chunk, dtype))
    assert outputs == as_tuples(spec.outputs(chunk, dtype))


def test_engine_profiles_from_the_spec_are_the_manifests(exported, tiny_model):
    """The TensorRT profile the spec gives equals the one the engine build derives from the manifest."""
    from engines.tensorrt_manifest import profile_shapes

    res, shape = exported
    dtype = {"fp32": "float32", "fp16": "float16"}[res.manifest.precision]
    spec_profile = UNetIO.of(tiny_model).profile(shape, dtype)
    assert {k: v for k, v in spec_profile.items() if k in profile_shapes(res.manifest, "unet")} \
        == profile_shapes(res.manifest, "unet")
    assert all(lo == opt == hi for lo, opt, hi in spec_profile.values())  # static: CUDA graphs apply


def test_spec_sample_inputs_feed_the_exported_graph_by_name(exported, tiny_model):
    """ONNX Runtime accepts the spec's sample inputs by name (fp32 graph: the CPU EP runs it) and the
    result has the spec's output shape."""
    from export.parity import run_onnx

    res, shape = exported
    if res.manifest.precision != "fp32":
        pytest.skip("the CPU EP lacks fp16 kernels for some ops; the fp32 export runs it")
    spec = UNetIO.of(tiny_model)
    feeds = {k: v.numpy() for k, v in spec.sample_inputs(shape, "float32").items()}
    (eps,) = run_onnx(res.folder / res.manifest.graphs["unet"].file, feeds)
    assert tuple(eps.shape) == spec.outputs(shape, "float32")[0].shape


def test_dynamic_rows_profile_spans_one_prompt_to_the_batch(tiny_model):
    spec = UNetIO.of(tiny_model)
    shape = IOShape.of(3, VIEWS, 64, 32)
    prof = spec.profile(shape, "float16", min_rows=VIEWS)
    assert prof["sample"] == [[VIEWS, 4, 8, 4], [6, 4, 8, 4], [6, 4, 8, 4]]
    assert prof["timestep"] == [[1], [1], [1]]
    assert engine_profile({"x": ("batch", 3)}, rows=6, min_rows=2) == {"x": [[2, 3], [6, 3], [6, 3]]}


def test_call_unet_is_the_wrapper_call(tiny_model):
    """The spec's feed through the ONNX wrapper and its direct UNet call give the same eps."""
    from export.wrappers import UNetWrapper
    from mvz.models.attention import MVSettings

    spec = UNetIO.of(tiny_model)
    shape = IOShape.of(1, VIEWS, 32, 64)
    feeds = spec.sample_inputs(shape, "float32", seed=3)
    with torch.no_grad():
        a = spec.feed(UNetWrapper(tiny_model.unet, VIEWS, 4, 8), feeds)
        b = spec.call_unet(tiny_model.unet, feeds, MVSettings(VIEWS, 4, 8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert tuple(a.shape) == spec.outputs(shape, "float32")[0].shape
