"""One sampling request, one set of limits: the same bad value is refused by ``mvz generate``'s options, by
``mvz serve``'s request schema and by the pipeline, each naming the same field (spelled ``--zmv-steps`` on the
command line, ``zmv_steps`` in a JSON body)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from mvz import spec as sp
from mvz.cli import main


@dataclass(frozen=True)
class Bad:
    field: str
    cli: tuple[str, ...]  # generate options
    body: dict  # serve request body fields
    pipeline: dict | None  # MultiviewPipeline.sample keywords (None: not a pipeline argument)


BAD = [
    Bad("steps", ("--steps", "0"), {"steps": 0}, {"steps": 0}),
    Bad("steps", ("--steps", "51"), {"steps": 51}, {"steps": 51}),
    Bad("guidance", ("--guidance", "-1"), {"guidance": -1}, {"guidance": -1.0}),
    Bad("guidance", ("--guidance", "101"), {"guidance": 101}, {"guidance": 101.0}),
    Bad("elevation", ("--elevation", "91"), {"elevation": 91}, {"cameras": (0.0, 90.0, 91.0)}),
    Bad("azimuths", ("--azimuths", "0,4000"), {"azimuths": [0, 4000]}, {"cameras": (0.0, 4000.0)}),
    Bad("views", ("--views", "0"), {"views": 0}, {"cameras": ()}),
    Bad("zmv_steps", ("--steps", "2", "--zmv", "--zmv-steps", "3"), {"steps": 2, "zmv": True, "zmv_steps": 3},
        {"steps": 2, "zmv": True, "zmv_steps": 3}),
    Bad("resolution", ("--resolution", "100"), {"resolution": 100}, {"height": 100, "width": 100}),
    Bad("lora_scale", ("--lora-scale", "11"), {"lora_scale": 11}, None),
]
IDS = [f"{b.field}-{i}" for i, b in enumerate(BAD)]


@pytest.mark.parametrize("bad", BAD, ids=IDS)
def test_generate_names_the_flag(bad: Bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a chair", "--model", "tiny", "--out", str(tmp_path / "o.png"), *bad.cli])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert sp.flag_label(bad.field) in line, line
    assert not (tmp_path / "o.png").exists()


def _serve_limits(model) -> sp.Limits:
    return sp.HOUSE_LIMITS.narrowed(default_resolution=model.info.default_resolution, max_views=16,
                                    resolution_multiple=model.resolution_multiple, max_resolution=2048)


@pytest.mark.parametrize("bad", BAD, ids=IDS)
def test_serve_schema_names_the_field(bad: Bad, tiny_model):
    from serve.schema import FieldError, GenerateBody, resolve

    try:
        resolve(GenerateBody(prompt="a chair", **bad.body), _serve_limits(tiny_model))
    except ValidationError as err:  # the schema's own bounds (422 from FastAPI)
        assert bad.field in {e["loc"][0] for e in err.errors()}, err
    except FieldError as err:  # the spec's check against this server's limits
        assert err.field == bad.field, err
    else:
        pytest.fail(f"{bad.body} was accepted")


@pytest.mark.parametrize("bad", [b for b in BAD if b.pipeline is not None],
                         ids=[i for i, b in zip(IDS, BAD, strict=True) if b.pipeline is not None])
def test_pipeline_names_the_field(bad: Bad, tiny_model):
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import MultiviewPipeline

    kw = dict(bad.pipeline)
    if "cameras" in kw:
        az = kw.pop("cameras")
        kw["cameras"] = CameraSet(azimuths=az[:2], elevation=az[2]) if bad.field == "elevation" else CameraSet(azimuths=az)
    with pytest.raises(sp.SpecError) as err:
        MultiviewPipeline(tiny_model).sample(["a chair"], [0], **kw)
    assert err.value.field == bad.field


def test_the_batching_key_is_the_spec_and_equal_requests_share_it(tiny_model):
    from serve.schema import GenerateBody, resolve

    lim = _serve_limits(tiny_model)
    a, _ = resolve(GenerateBody(prompt="a chair", steps=2, views=2), lim)
    b, _ = resolve(GenerateBody(prompt="a cat", seed=3, steps=2, azimuths=[0, 180]), lim)
    c, _ = resolve(GenerateBody(prompt="a cat", steps=3, views=2), lim)
    assert isinstance(a, sp.SampleSpec) and a == b and hash(a) == hash(b) and a != c
    assert a.height == tiny_model.info.default_resolution  # sized to the model's default


def test_engine_limits_fix_views_size_and_lora_scale():
    fixed = sp.HOUSE_LIMITS.narrowed(fixed_views=2, fixed_resolution=64, lora_scale=1.0)
    spec = sp.SampleSpec.build(views=2, resolution=64)
    assert spec.check(fixed) is spec
    for bad, field in ((sp.SampleSpec.build(views=3, resolution=64), "views"),
                       (sp.SampleSpec.build(views=2, resolution=128), "resolution"),
                       (sp.SampleSpec.build(views=2, resolution=64, lora_scale=0.5), "lora_scale")):
        with pytest.raises(sp.SpecError) as err:
            bad.check(fixed)
        assert err.value.field == field
    assert sp.SampleSpec.build(views=2, resolution=64, lora_scale=0.5).check(fixed.narrowed(lora_scale_settable=True))


def test_the_defaults_are_the_models_and_the_schedulers():
    from mvz.models.cameras import DEFAULT_AZIMUTHS, CameraSet
    from mvz.scheduler import ORIGINAL_INFERENCE_STEPS

    assert sp.DEFAULT_AZIMUTHS == DEFAULT_AZIMUTHS and sp.MAX_STEPS == ORIGINAL_INFERENCE_STEPS
    for views in (None, 1, 4, 6, 8):
        assert sp.default_azimuths(views) == CameraSet.default(views).azimuths


def test_the_pipeline_never_changes_its_denoiser(tiny_model):
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import MultiviewPipeline, TorchDenoiser

    denoiser = TorchDenoiser(tiny_model, 6)
    pipe = MultiviewPipeline(tiny_model, denoiser=denoiser)
    two = pipe.sample(["a chair"], [0], steps=1, cameras=CameraSet.default(2), height=32, width=32).images
    assert denoiser.num_views == 6 and pipe.denoiser is denoiser
    fresh = MultiviewPipeline(tiny_model, denoiser=TorchDenoiser(tiny_model, 2))
    assert (fresh.sample(["a chair"], [0], steps=1, cameras=CameraSet.default(2), height=32, width=32).images == two).all()
