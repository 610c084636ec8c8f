"""Model (+ LoRA) -> portable ONNX: fuse, wrap, export, clean up, check parity, write a manifest.

Public entry points:

* :func:`export.exporter.export_model` -- the whole export of a loaded ``MultiviewModel`` into a folder;
* :func:`export.fuse.fused_unet` / :func:`export.fuse.lora_fused_in_place` -- LoRA fusion (copy / in place);
* :class:`export.wrappers.UNetWrapper` / :class:`export.wrappers.VAEDecoderWrapper` -- tensor-only modules;
* :func:`export.onnx_export.export_graph` -- one module to one clean, checked graph;
* :func:`mvz.artifacts.manifest.read_manifest` / :func:`mvz.artifacts.manifest.check_request` -- what an export is and
  whether it fits a request;
* :func:`export.refit_map.build_refit_map` / :func:`mvz.artifacts.refit_plan.plan_refit` -- TensorRT refit (all or nothing);
* :func:`export.memory_plan.export_plan` -- the device-memory plan of an export and build.

``mvz`` never imports this package; this package imports ``mvz``.
"""

from __future__ import annotations

__all__ = ["EXPORTERS", "export_model", "fused_unet", "read_manifest", "check_request"]

# the trace routes (torch-free here, so the CLI checks --exporter before importing torch): ``dynamo`` traces on
# the meta device (the default), ``torchscript`` runs the model (ModelOpt's Q/DQ export needs it)
EXPORTERS = ("dynamo", "torchscript")


def __getattr__(name: str):
    if name == "export_model":
        from export.exporter import export_model

        return export_model
    if name == "fused_unet":
        from export.fuse import fused_unet

        return fused_unet
    if name in ("read_manifest", "check_request"):
        from mvz.artifacts import manifest

        return getattr(manifest, name)
    raise AttributeError(name)
