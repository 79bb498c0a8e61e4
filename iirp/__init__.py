"""iirp: deployment toolkit for IIRP-Net deformable 3D registration.

``import iirp`` needs neither torch nor any accelerator library; the
subpackages import their heavy dependencies where they use them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
