"""``cameras.json``: the views' cameras exactly as the model was conditioned, for 3D reconstruction and texturing.

Field names follow nerfstudio's / instant-ngp's ``transforms.json`` where they apply (``camera_model``, ``w``,
``h``, ``frames[].file_path``, ``frames[].transform_matrix``), so those loaders find what they expect:

- ``transform_matrix``: camera-to-world, 4x4, row-major, OpenGL/Blender axes (camera looks down its -z, +y up),
  as nerfstudio and instant-ngp store it; ``c2w_opencv`` is the same camera with OpenCV axes (+z forward,
  +y down), the convention MV-Adapter's Plücker maps are computed in.
- The world is z-up with the object at the origin; cameras sit at ``distance`` from it.
- MV-Adapter's T2MV cameras are orthographic: ``camera_model`` is ``ORTHOGRAPHIC`` and ``ortho_scale`` is the
  width (and height) of the world-space box the image spans (1.1: ±0.55), so a pixel is ``ortho_scale / w``
  world units wide. There is no focal length.
- ``plucker``: the 6-vector ``[view_dir, normalize(cam_pos)]`` the adapter saw for that view (before its
  ``(x + 1) / 2`` offset), so a user can check a reconstruction against the conditioning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mvz.models.cameras import ORTHO_SCALE, CameraSet

FORMAT = "mvz-cameras/1"
_OPENCV_TO_OPENGL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


def c2w_opencv(cameras: CameraSet) -> torch.Tensor:
    """(V, 4, 4) camera-to-world with OpenCV axes: +z toward the origin, +x right, +y down, world up +z."""
    mats = []
    for pos in cameras.positions().double():
        forward = -pos / pos.norm()
        world_up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        right = torch.linalg.cross(forward, world_up)
        if right.norm() < 1e-9:  # looking straight down or up: any horizontal right vector works
            right = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        mat = torch.eye(4, dtype=torch.float64)
        mat[:3, 0], mat[:3, 1], mat[:3, 2], mat[:3, 3] = right, down, forward, pos
        mats.append(mat)
    return torch.stack(mats).float()


def cameras_record(cameras: CameraSet, file_names: Sequence[str], width: int, height: int) -> dict[str, Any]:
    """The ``cameras.json`` content for one view set (views in the order of ``file_names``)."""
    if len(file_names) != cameras.num_views:
        raise ValueError(f"{len(file_names)} file names for {cameras.num_views} views")
    opencv = c2w_opencv(cameras)
    plucker = cameras.plucker_vectors()
    frames = []
    for i, name in enumerate(file_names):
        frames.append({
            "file_path": name,
            "azimuth_deg": cameras.azimuths[i],
            "elevation_deg": cameras.elevation,
            "transform_matrix": _rows(opencv[i] @ _OPENCV_TO_OPENGL),
            "c2w_opencv": _rows(opencv[i]),
            "plucker": [round(float(v), 8) for v in plucker[i]],
        })
    return {"format": FORMAT, "camera_model": "ORTHOGRAPHIC", "w": width, "h": height, "ortho_scale": ORTHO_SCALE,
            "distance": cameras.distance, "world_up": [0.0, 0.0, 1.0], "convention": "transform_matrix: OpenGL "
            "camera-to-world (nerfstudio/instant-ngp); c2w_opencv: OpenCV camera-to-world", "frames": frames}


def plucker_from_record(record: dict[str, Any]) -> torch.Tensor:
    """(V, 6) ``[view_dir, normalize(cam_pos)]`` rebuilt from a ``cameras.json`` record's OpenGL matrices."""
    rows = []
    for frame in record["frames"]:
        c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        view_dir = -c2w[:3, 2]  # OpenGL cameras look down their -z
        pos = c2w[:3, 3]
        rows.append(torch.cat([view_dir / view_dir.norm(), pos / pos.norm()]))
    return torch.stack(rows).float()


def _rows(mat: torch.Tensor) -> list[list[float]]:
    return [[_clean(float(v)) for v in row] for row in mat]


def _clean(value: float) -> float:
    """Round away float noise (cos 90° = 6e-17) so the file reads as the cameras are: 0.0, not 6.1e-17."""
    value = round(value, 8)
    return 0.0 if value == 0 or math.isclose(value, 0.0, abs_tol=1e-12) else value
