"""Orthographic multiview cameras and their constant Plücker maps (MV-Adapter T2MV).

Facts (``docs/architecture.md``, *Cameras*): orthographic, elevation 0, distance 1.8, up +z, azimuths
0/45/90/180/270/315 passed to the camera builder as ``azimuth - 90``; Blender-style c2w converted to
OpenCV; each view is the spatially constant 6-vector ``[view_dir, normalize(cam_pos)]`` and the adapter
input is ``clamp((x + 1) / 2, 0, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_AZIMUTHS: tuple[float, ...] = (0.0, 45.0, 90.0, 180.0, 270.0, 315.0)
CAMERA_DISTANCE = 1.8
ORTHO_SCALE = 1.1


@dataclass(frozen=True)
class CameraSet:
    """The views of one generation: azimuths (degrees) at one elevation."""

    azimuths: tuple[float, ...] = DEFAULT_AZIMUTHS
    elevation: float = 0.0
    distance: float = CAMERA_DISTANCE

    @classmethod
    def default(cls, num_views: int | None = None) -> CameraSet:
        """The training cameras for 6 views; for another count, evenly spaced azimuths from 0."""
        if num_views is None or num_views == len(DEFAULT_AZIMUTHS):
            return cls()
        if num_views < 1:
            raise ValueError("num_views must be >= 1")
        return cls(tuple(360.0 * i / num_views for i in range(num_views)))

    @property
    def num_views(self) -> int:
        return len(self.azimuths)

    def positions(self) -> torch.Tensor:
        """(V, 3) camera centres in world space (z up), with the upstream ``azimuth - 90`` convention."""
        el = math.radians(self.elevation)
        rows = []
        for az_deg in self.azimuths:
            az = math.radians(az_deg - 90.0)
            rows.append(
                [
                    self.distance * math.cos(el) * math.cos(az),
                    self.distance * math.cos(el) * math.sin(az),
                    self.distance * math.sin(el),
                ]
            )
        return torch.tensor(rows, dtype=torch.float32)

    def plucker_vectors(self) -> torch.Tensor:
        """(V, 6): ``[view_dir, normalize(cam_pos)]``; an orthographic camera looking at the origin has
        its OpenCV +z axis (the ray direction) along ``-normalize(cam_pos)``."""
        pos = torch.nn.functional.normalize(self.positions(), dim=-1)
        return torch.cat([-pos, pos], dim=-1)

    def adapter_input(self, height: int, width: int) -> torch.Tensor:
        """(V, 6, H, W) in [0, 1]: the T2I-Adapter input at pixel resolution."""
        vec = ((self.plucker_vectors() + 1.0) / 2.0).clamp(0, 1)
        return vec[:, :, None, None].expand(-1, -1, height, width).contiguous()
