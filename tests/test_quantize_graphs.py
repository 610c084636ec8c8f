"""Quantized graphs as a GPU export writes them, checked on the CPU: an fp16 base stays fp16 outside the Q/DQ
pairs (no fp32 the plain fp16 export does not have), FP8's rewrite replaces the graph files instead of
appending to them, and calibration feeds the UNet on the UNet's device."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

VIEWS, RES = 2, 64
FP32 = 1  # onnx.TensorProto.FLOAT


def _fp32_census(path) -> Counter:
    """fp32 initializers and fp32 activations (graph outputs included) of the graph at ``path``."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    census: Counter = Counter()
    census["initializers"] = sum(1 for i in model.graph.initializer if i.data_type == FP32)
    census["activations"] = sum(1 for v in list(model.graph.value_info) + list(model.graph.output)
                                if v.type.tensor_type.elem_type == FP32)
    return census


def _qdq_io_dtypes(path) -> set[int]:
    """Element types of every tensor entering or leaving a QuantizeLinear/DequantizeLinear, except the
    quantized (int8/fp8) side."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    found = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            found |= {types.get(node.input[0]), types.get(node.input[1])}
        elif node.op_type == "DequantizeLinear":
            found |= {types.get(node.input[1]), types.get(node.output[0])}
    return found - {None}


def _fp16_tiny(model):
    """The tiny model's UNet and encoders in fp16, as a GPU export has them (CPU fp16 kernels suffice here)."""
    half = copy.copy(model)
    for name in ("unet", "text_encoder", "text_encoder_2", "adapter"):
        setattr(half, name, copy.deepcopy(getattr(model, name)).half())
    return half


@pytest.fixture(scope="module")
def fp16_graphs(tiny_model, tmp_path_factory):
    """The plain fp16 UNet export and its INT8 Q/DQ export over the same fp16 base."""
    from export.onnx_export import export_graph
    from export.quantize import CalibrationSpec, calibrated_unet, export_quantized_graph
    from export.wrappers import UNET_INPUTS, UNET_OUTPUTS, UNetWrapper, unet_example_inputs

    model = _fp16_tiny(tiny_model)
    out = tmp_path_factory.mktemp("fp16q")
    args = unet_example_inputs(tiny_model, torch.float16, VIEWS, RES, RES)
    paths = {"fp16": out / "fp16.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the baseline takes the quantized export's route (TorchScript: ModelOpt's Q/DQ needs it), so the census
        # compares what quantization adds, not what the two trace routes keep in fp32
        export_graph(UNetWrapper(model.unet, VIEWS, RES // 8, RES // 8).eval(), args, paths["fp16"], UNET_INPUTS,
                     UNET_OUTPUTS, opset=19, exporter="torchscript")
        for precision in ("int8", "fp8"):
            spec = CalibrationSpec(precision, ["a red car"], 1, num_views=VIEWS, height=RES, width=RES,
                                   base_dtype="fp16")
            unet = copy.deepcopy(model.unet)
            res = calibrated_unet(model, unet, spec, model_fp="tiny-fp16", lora=None, cache_dir=out / "calib")
            paths[precision] = out / f"{precision}.onnx"
            export_quantized_graph(precision)(UNetWrapper(res.unet, VIEWS, RES // 8, RES // 8).eval(), args,
                                              paths[precision], UNET_INPUTS, UNET_OUTPUTS, opset=19)
    return paths


@pytest.mark.slow  # two fp16 calibrations and three UNet exports on the CPU
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_fp16_base_qdq_graph_has_no_fp32_outside_the_qdq_scales(fp16_graphs, precision):
    import onnx

    from export.quantize import qdq_layers

    assert qdq_layers(fp16_graphs[precision])  # it is quantized
    # quantization adds no fp32: the only fp32 left is what the plain fp16 export has too (diffusers'
    # sinusoidal timestep embeddings and scalar shape arithmetic)
    assert _fp32_census(fp16_graphs[precision]) == _fp32_census(fp16_graphs["fp16"])
    assert _qdq_io_dtypes(fp16_graphs[precision]) == {onnx.TensorProto.FLOAT16}  # scales and DQ outputs fp16
    eps = onnx.load(str(fp16_graphs[precision]), load_external_data=False).graph.output[0]
    assert eps.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_qdq_dtype_follows_the_base_dtype():
    """The config that decides the graph's Q/DQ type (the fast guard of the slow graph test above)."""
    from export.quantize import modelopt_config

    for precision in ("int8", "fp8"):
        for base, want in (("fp16", "Half"), ("fp32", "Float"), ("bf16", "BFloat16")):
            cfg = modelopt_config(precision, ["a", "b"], base)
            enabled = [e for e in cfg["quant_cfg"] if e.get("enable")]
            assert len(enabled) == 4 and all(e["cfg"]["trt_high_precision_dtype"] == want for e in enabled)


# ---- FP8's second save ----------------------------------------------------------------------------------

def _fp8_net():
    import modelopt.torch.quantization as mtq

    from export.quantize import modelopt_config

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(2, 4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(net, modelopt_config("fp8", ["0", "2"], "fp32"), forward_loop=lambda m: m(x))
    return net, x


def test_fp8_rewrite_replaces_external_data_instead_of_appending(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from export.quantize import export_quantized_graph

    net, x = _fp8_net()
    path = tmp_path / "unet.onnx"
    (tmp_path / "unet.onnx.data").write_bytes(b"stale bytes of an earlier export" * 1000)
    sizes = []
    for _ in range(2):  # a re-export into a folder that already holds both files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = export_quantized_graph("fp8")(net, (x,), path, ["x"], ["y"], opset=19, external_data=True)
        sizes.append((tmp_path / "unet.onnx.data").stat().st_size)
        assert saved.external_data == tmp_path / "unet.onnx.data"
    model = onnx.load(str(path), load_external_data=False)
    external = sum(int(e.value) for i in model.graph.initializer for e in i.external_data if e.key == "length")
    assert sizes[0] == sizes[1] == external > 0  # exactly the data the graph points at, nothing appended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]  # no temp left
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(y, net(x).numpy(), atol=0.1, rtol=0.1)


# ---- calibration on the UNet's device -------------------------------------------------------------------

class _DeviceRecordingUNet(torch.nn.Module):
    """A UNet wrapper whose parameters live on another device ("meta" stands in for the GPU): records the
    device of every tensor it is called with and answers zeros on the CPU."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.devices: list[set[str]] = []

    def forward(self, sample, timestep, *rest):
        self.devices.append({t.device.type for t in (sample, timestep, *rest)})
        return torch.zeros(sample.shape)


def test_calibration_feeds_the_unet_on_its_own_device(tiny_model):
    """The memory plan keeps the text encoders on the CPU while the UNet calibrates on the GPU: every tensor
    (latents, timestep, prompt embeddings, time ids, camera residuals) must reach the UNet on its device."""
    from export.quantize import CalibrationSpec, sampler_forward_loop

    fake = _DeviceRecordingUNet()
    spec = CalibrationSpec("int8", ["a red car", "a chair"], 2, num_views=VIEWS, height=RES, width=RES, base_dtype="fp32")
    loop, counter = sampler_forward_loop(tiny_model, fake, spec)
    loop(None)
    assert counter.calls == len(fake.devices) == 4
    assert all(d == {"meta"} for d in fake.devices), fake.devices
