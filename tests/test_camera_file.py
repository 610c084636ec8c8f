"""cameras.json: the cameras a 3D tool needs, equal to the conditioning the model used."""

from __future__ import annotations

import json

import pytest
import torch

from mvz.models.camera_file import c2w_opencv, cameras_record, plucker_from_record
from mvz.models.cameras import CameraSet

SETS = {"paper-6": CameraSet(), "orthogonal-4": CameraSet((0.0, 90.0, 180.0, 270.0)),
        "raised-3": CameraSet((10.0, 130.0, 250.0), elevation=20.0)}


@pytest.mark.parametrize("name", sorted(SETS))
def test_plucker_rebuilt_from_cameras_json_equals_the_conditioning(name, tmp_path):
    cams = SETS[name]
    files = [f"view{i}.png" for i in range(cams.num_views)]
    (tmp_path / "cameras.json").write_text(json.dumps(cameras_record(cams, files, 64, 64)))
    record = json.loads((tmp_path / "cameras.json").read_text())
    rebuilt = plucker_from_record(record)
    assert torch.allclose(rebuilt, cams.plucker_vectors(), atol=1e-6)
    # the adapter input exactly as the model computes it, from the file alone
    adapter = ((rebuilt + 1) / 2).clamp(0, 1)[:, :, None, None].expand(-1, -1, 32, 32)
    assert torch.allclose(adapter, cams.adapter_input(32, 32), atol=1e-6)
    assert [f["file_path"] for f in record["frames"]] == files
    assert [f["azimuth_deg"] for f in record["frames"]] == list(cams.azimuths)


def test_matrices_are_rigid_look_at_cameras():
    mats = c2w_opencv(SETS["raised-3"])
    rot = mats[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(3), atol=1e-6)
    pos = mats[:, :3, 3]
    forward = rot[:, :, 2]
    assert torch.allclose(forward, -pos / pos.norm(dim=-1, keepdim=True), atol=1e-6)  # looks at the origin
    assert (rot[:, 2, 1] <= 1e-6).all()  # image +y (down) points against world +z (up)


def test_record_is_orthographic_with_the_models_extent():
    record = cameras_record(CameraSet(), [f"v{i}.png" for i in range(6)], 768, 768)
    assert record["camera_model"] == "ORTHOGRAPHIC" and record["ortho_scale"] == 1.1
    assert (record["w"], record["h"]) == (768, 768)
    with pytest.raises(ValueError):
        cameras_record(CameraSet(), ["only-one.png"], 768, 768)
