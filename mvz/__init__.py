"""mvz: few-step text-to-multiview diffusion (MV-Adapter SDXL + MVC-ZigAL)."""

__version__ = "0.1.0"
