"""Quality-control picture of one registration: a PNG readable at a glance.

Three rows (sagittal, coronal and axial mid-slices of the fixed image's grid)
and six columns: fixed, moving (before deformable registration: on the fixed
grid through the pre-alignment only), warped, a checkerboard of fixed and
warped, the deformation grid, and the Jacobian determinant of ``x -> x + u(x)``
(1 = volume kept; folding, det J <= 0, in a distinct colour).

Everything is shown in the RAS orientation (:data:`iirp.runtime.geometry.MODEL_ORIENTATION`)
whatever the input's storage order, in millimetres, neurological convention
(the subject's right on the right of axial and coronal views), with the
anatomical direction at each axis end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from iirp.atomic import write_file
from iirp.runtime.deformation import jacobian_determinant
from iirp.runtime.geometry import ModelGrid, array_from_image, orient
from iirp.typing import PathLike

__all__ = ["qc_slices", "write_qc_png"]

#: view name -> (sliced array axis, horizontal axis, vertical axis, labels at the axis ends).
_VIEWS: dict[str, tuple[int, int, int, tuple[str, str, str, str]]] = {
    "sagittal": (0, 1, 2, ("P", "A", "I", "S")),
    "coronal": (1, 0, 2, ("L", "R", "I", "S")),
    "axial": (2, 0, 1, ("L", "R", "P", "A")),
}
_COLUMNS = ("fixed", "moving", "warped", "checkerboard fixed | warped", "deformation grid", "Jacobian determinant")
_FOLDING_RGBA = (1.0, 0.0, 1.0, 1.0)  # magenta: det J <= 0


def _oriented(image: sitk.Image) -> np.ndarray:
    return array_from_image(orient(image), dtype=np.float32)


def _voxel_displacement(field: sitk.Image) -> np.ndarray:
    """``(3, X, Y, Z)`` displacement in voxels of the RAS-oriented grid, component c along axis c."""
    oriented = orient(field)
    grid = ModelGrid.of(oriented)
    mm = sitk.GetArrayFromImage(oriented).astype(np.float64).transpose(2, 1, 0, 3)  # (X, Y, Z, 3) LPS mm
    index_frame = mm @ grid.direction_matrix()  # D^T u per voxel: mm along the index axes
    return np.moveaxis(index_frame / np.asarray(grid.spacing), -1, 0).astype(np.float32)


def qc_slices(
    fixed: sitk.Image, moving_before: sitk.Image, warped: sitk.Image, field: sitk.Image
) -> dict[str, Any]:
    """The arrays the QC picture shows, all RAS-oriented ``(X, Y, Z)`` on the fixed image's grid.

    Args:
        fixed, moving_before, warped: scalar images on the fixed grid (any pixel type).
        field: the ITK displacement field on the fixed grid (mm, LPS).

    Returns:
        ``fixed``, ``moving``, ``warped``, ``jacobian`` arrays, ``displacement`` ``(3, X, Y, Z)`` in
        voxels, and ``spacing`` (mm per axis).
    """
    return {
        "fixed": _oriented(fixed),
        "moving": _oriented(moving_before),
        "warped": _oriented(warped),
        "jacobian": _oriented(jacobian_determinant(field)),
        "displacement": _voxel_displacement(field),
        "spacing": tuple(float(s) for s in orient(fixed).GetSpacing()),
    }


def _plane(volume: np.ndarray, view: str) -> np.ndarray:
    """Mid-slice ``(horizontal, vertical)`` of an ``(X, Y, Z)`` array.

    Every view's horizontal axis precedes its vertical one (:data:`_VIEWS`), so the
    remaining axes are already in display order.
    """
    axis = _VIEWS[view][0]
    return np.take(volume, volume.shape[axis] // 2, axis=axis)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    ii, jj = np.indices(a.shape)
    size = max(1, max(a.shape) // tiles)
    return np.where(((ii // size) + (jj // size)) % 2 == 0, a, b)


def _draw_grid(ax: Any, u_h: np.ndarray, u_v: np.ndarray, spacing: tuple[float, float], step: int) -> None:
    """Lines of the deformed grid ``p + u(p)`` (mm) every ``step`` voxels."""
    nh, nv = u_h.shape
    hh, vv = np.meshgrid(np.arange(nh), np.arange(nv), indexing="ij")
    x = (hh + u_h) * spacing[0]
    y = (vv + u_v) * spacing[1]
    for i in range(0, nh, step):
        ax.plot(x[i, :], y[i, :], color="black", linewidth=0.5)
    for j in range(0, nv, step):
        ax.plot(x[:, j], y[:, j], color="black", linewidth=0.5)


def write_qc_png(
    path: PathLike,
    fixed: sitk.Image,
    moving_before: sitk.Image,
    warped: sitk.Image,
    field: sitk.Image,
    title: str = "",
    dpi: int = 100,
) -> None:
    """Write the QC picture (see the module docstring) to ``path`` (PNG).

    Args:
        path: output file; written through a temporary name, so it appears whole or not at all.
        fixed, moving_before, warped, field: as for :func:`qc_slices`.
        title: a line above the panels (pair, method, iterations...).
    """
    import matplotlib
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure state, faster import

    data = qc_slices(fixed, moving_before, warped, field)
    lo, hi = np.percentile(data["fixed"], [1.0, 99.5])
    hi = hi if hi > lo else lo + 1.0
    fig = Figure(figsize=(21, 11))
    axes = fig.subplots(3, 6, squeeze=False)
    fig.subplots_adjust(left=0.03, right=0.9, bottom=0.04, top=0.9, wspace=0.12, hspace=0.22)
    jac_image = None
    for row, view in enumerate(_VIEWS):
        axis, h, v, (h_lo, h_hi, v_lo, v_hi) = _VIEWS[view]
        sp = (data["spacing"][h], data["spacing"][v])
        planes = {k: _plane(data[k], view) for k in ("fixed", "moving", "warped", "jacobian")}
        extent = (0.0, planes["fixed"].shape[0] * sp[0], 0.0, planes["fixed"].shape[1] * sp[1])
        shown = {
            "fixed": planes["fixed"], "moving": planes["moving"], "warped": planes["warped"],
            "checkerboard fixed | warped": _checkerboard(planes["fixed"], planes["warped"]),
        }
        for col, name in enumerate(_COLUMNS):
            ax = axes[row, col]
            if name in shown:
                ax.imshow(shown[name].T, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=extent,
                          interpolation="nearest")
            elif name == "deformation grid":
                ax.imshow(planes["fixed"].T, origin="lower", cmap="gray", vmin=lo, vmax=hi * 3, extent=extent,
                          interpolation="nearest")
                u_h = _plane(data["displacement"][h], view)
                u_v = _plane(data["displacement"][v], view)
                _draw_grid(ax, u_h, u_v, sp, step=max(2, max(u_h.shape) // 40))
                ax.set_xlim(extent[0], extent[1])
                ax.set_ylim(extent[2], extent[3])
            else:
                jac = planes["jacobian"]
                cmap = matplotlib.colormaps["RdBu_r"].copy()
                jac_image = ax.imshow(jac.T, origin="lower", cmap=cmap, norm=TwoSlopeNorm(1.0, 0.0, 2.0),
                                      extent=extent, interpolation="nearest")
                folds = np.ma.masked_where(jac.T > 0, np.ones_like(jac.T))
                ax.imshow(folds, origin="lower", cmap=matplotlib.colors.ListedColormap([_FOLDING_RGBA]),
                          extent=extent, interpolation="nearest")
                ax.set_title(f"{name}\nfolding (det J <= 0): {int((jac <= 0).sum())} voxels in slice",
                             fontsize=9)
            if name != "Jacobian determinant":
                ax.set_title(name if row == 0 else "", fontsize=10)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{h_lo}  <-  ->  {h_hi}", fontsize=8)
            ax.set_ylabel(f"{view}\n{v_lo}  <-  ->  {v_hi}" if col == 0 else f"{v_lo}  <-  ->  {v_hi}",
                          fontsize=8)
    if jac_image is not None:
        fig.colorbar(jac_image, ax=axes[:, 5].tolist(), fraction=0.05, label="det J (magenta: <= 0)")
    if title:
        fig.suptitle(title, fontsize=12)
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
