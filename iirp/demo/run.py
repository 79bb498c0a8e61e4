"""The built-in example: a synthetic pair from the ICBM 2009a template, registered end to end.

:func:`run_demo` exports the packaged demo checkpoint once (cached), makes a pair from the
packaged T1 template with a fixed-seed known deformation (:func:`iirp.synthetic.make_pair`),
registers it through the torch-free runtime (``iirp.runtime.make_solver`` +
``register_files``, the same path as ``iirp-run --engines``) and scores it against the
ground truth: end-point error in the brain (GM or WM of the fixed label map) and GM / WM Dice.

The data (see ``iirp/demo/data/LICENSE-ICBM152.txt`` and :mod:`iirp.demo._make`) lie on the
demo model grid: :data:`DEMO_SHAPE` voxels of :data:`DEMO_SPACING` mm, RAS. Flows follow
:mod:`iirp.runtime.geometry`.
"""

from __future__ import annotations

import contextlib
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import SimpleITK as sitk

from iirp.cache import cache_dir
from iirp.typing import PathLike

__all__ = ["DEMO_SHAPE", "DEMO_SPACING", "DEMO_SEED", "DEMO_MAX_DISPLACEMENT", "TISSUES", "demo_file",
           "demo_engines", "make_demo_pair", "run_demo"]

#: Demo model grid ``(X, Y, Z)`` and spacing in mm (the checkpoint's training grid).
DEMO_SHAPE = (64, 80, 64)
DEMO_SPACING = 2.5
#: Seed and bound (voxels) of the demo pair's deformation.
DEMO_SEED = 2024
DEMO_MAX_DISPLACEMENT = 4.0
#: Labels of ``icbm152_tissue.nii.gz``.
TISSUES = {"gm": 1, "wm": 2}
_CHECKPOINT = "demo_rpnet.pt"


@contextlib.contextmanager
def demo_file(name: str) -> Iterator[Path]:
    """A file of ``iirp/demo/data`` as a real path (``importlib.resources``), for the ``with`` block."""
    with resources.as_file(resources.files("iirp.demo").joinpath("data").joinpath(name)) as path:
        yield Path(path)


def demo_engines(progress: bool = True) -> Path:
    """The exported demo checkpoint: ``<cache>/demo/<sha256[:16]>/engines`` (exported on first use).

    ``<cache>`` is ``$IIRP_CACHE_DIR`` or ``~/.cache/iirp``. An existing folder is reused when its
    manifest's source sha256 is the packaged checkpoint's; exporting needs torch (torchscript
    exporter, unverified: a few seconds), reusing does not.
    """
    from iirp.manifest import MANIFEST_NAME, Manifest, sha256_file

    with demo_file(_CHECKPOINT) as checkpoint:
        digest = sha256_file(checkpoint)
        folder = cache_dir("demo", digest[:16], "engines")
        if (folder / MANIFEST_NAME).is_file():
            with contextlib.suppress(Exception):
                cached = Manifest.load(folder)
                if cached.source_sha256 == digest and cached.contract.spacing == (DEMO_SPACING,) * 3:
                    return folder
        from iirp.export import export_checkpoint

        folder.parent.mkdir(parents=True, exist_ok=True)
        export_checkpoint(checkpoint, folder, exporter="torchscript", verify=False, progress=progress,
                          spacing=DEMO_SPACING)  # the demo checkpoint records no grid: it was trained at 2.5 mm
    return folder


def _grid_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    from iirp.runtime.geometry import image_from_array

    return image_from_array(array, reference)


def make_demo_pair(folder: PathLike, seed: int = DEMO_SEED) -> dict[str, Any]:
    """Write the demo pair into ``folder``: ``fixed``, ``moving``, ``fixed_seg``, ``moving_seg``, ``true_displacement``.

    ``true_displacement.nii.gz`` is the ground truth as an ITK displacement field (mm, LPS,
    fixed grid, fixed x -> moving x + u(x)), like ``iirp-run``'s ``displacement.nii.gz``.

    Returns:
        ``{"paths": {name: Path}, "flow": (3, X, Y, Z) float32 true voxel flow,
        "fixed_seg": (X, Y, Z) uint8, "reference": the fixed image (geometry)}``.
    """
    from iirp.runtime.deformation import flow_to_physical
    from iirp.runtime.geometry import ModelGrid, array_from_image
    from iirp.synthetic import make_pair

    with demo_file("icbm152_t1.nii.gz") as t1_path, demo_file("icbm152_tissue.nii.gz") as seg_path:
        t1 = sitk.ReadImage(str(t1_path))
        seg = sitk.ReadImage(str(seg_path))
    volume = array_from_image(t1) / np.float32(255.0)
    labels = array_from_image(seg, dtype=np.uint8)
    pair = make_pair(volume, seed, labels=labels, max_displacement=DEMO_MAX_DISPLACEMENT)
    out = Path(os.fspath(folder))
    out.mkdir(parents=True, exist_ok=True)
    images = {
        "fixed": _grid_image(pair.fixed, t1),
        "moving": _grid_image(pair.moving, t1),
        "fixed_seg": _grid_image(pair.fixed_labels, t1),  # type: ignore[arg-type]
        "moving_seg": _grid_image(pair.moving_labels, t1),  # type: ignore[arg-type]
        "true_displacement": sitk.Cast(flow_to_physical(pair.flow, ModelGrid.of(t1)), sitk.sitkVectorFloat32),
    }
    paths = {}
    for name, image in images.items():
        paths[name] = out / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]), useCompression=True)
    return {"paths": paths, "flow": pair.flow, "fixed_seg": pair.fixed_labels, "reference": t1}


def _dice(fixed_seg: sitk.Image, other: sitk.Image) -> dict[str, float]:
    """GM and WM Dice (:func:`iirp.metrics.label_dice`) and their mean."""
    from iirp.metrics import label_dice

    other = sitk.Image(other)
    other.CopyInformation(fixed_seg)  # both are on the demo grid; the warped labels' header may round differently
    per_label = label_dice(fixed_seg, other, TISSUES.values())
    scores = {name: per_label.get(label, 0.0) for name, label in TISSUES.items()}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def _epe(estimate_mm: np.ndarray, truth_mm: np.ndarray, mask: np.ndarray, mm_to_voxel: np.ndarray) -> dict:
    error = estimate_mm - truth_mm  # (X, Y, Z, 3) mm, LPS
    mm = np.linalg.norm(error, axis=-1)[mask]
    voxels = np.linalg.norm(error @ mm_to_voxel.T, axis=-1)[mask]
    return {"mm": float(mm.mean()), "voxels": float(voxels.mean())}


def _demo_entry(entry: Path) -> bool:
    """What an earlier ``iirp-run --demo`` leaves in its folder: the registration's files and ``inputs/``."""
    from iirp.runtime.imageio import REGISTRATION_OUTPUTS

    if entry.name == "inputs":
        return entry.is_dir() and not entry.is_symlink()
    return entry.name in REGISTRATION_OUTPUTS and entry.is_file() and not entry.is_symlink()


def run_demo(out_dir: PathLike, engine: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """Register the demo pair and score it against the known deformation.

    Writes the usual ``iirp-run`` outputs in ``out_dir`` (``warped.nii.gz``, ``displacement.nii.gz``,
    ``warped_seg.nii.gz``, ``qc.png``, ``report.json``) and the pair in ``out_dir/inputs/``
    (:func:`make_demo_pair`), all or nothing. A folder that holds an earlier demo run is replaced;
    one that holds anything else is refused.

    Args:
        out_dir: output folder (created).
        engine: runtime engine over the exported stages (default: the fastest installed,
            :func:`~iirp.runtime.solvers.fastest_cpu_engine`; any engine of ``iirp-run``).
        progress: show the export's progress (first run only).

    Returns:
        ``iterations`` (levels 4..1), ``estimator_passes``, ``epe_before`` / ``epe_after``
        (``{"mm", "voxels"}``, mean over the brain), ``dice_before`` / ``dice_after``
        (``{"gm", "wm", "mean"}``), ``seconds`` (``export``, ``register``, ``total``),
        ``engines``, ``outputs`` and the registration ``report``.

    Raises:
        IirpError: the output folder cannot be written or holds other files, or the export / runtime fails.
    """
    import shutil
    import tempfile

    from iirp.atomic import replace_folder
    from iirp.runtime import RegistrationOptions, make_solver
    from iirp.runtime.geometry import ModelGrid
    from iirp.runtime.imageio import check_output_dir
    from iirp.runtime.register import read_inputs, register_images, write_registration

    t0 = time.perf_counter()
    out = check_output_dir(out_dir, overwrite=True, owned=_demo_entry)
    engines = demo_engines(progress)
    t1 = time.perf_counter()
    from iirp.runtime.solvers import fastest_cpu_engine

    solver = make_solver(engine or fastest_cpu_engine(), engines=engines)
    options = RegistrationOptions()  # the 2.5 mm grid comes from the engines' manifest
    with tempfile.TemporaryDirectory(prefix="iirp-demo-") as tmp:
        made = make_demo_pair(tmp)
        staged = made["paths"]
        inputs = read_inputs(staged["fixed"], staged["moving"], moving_seg=staged["moving_seg"], options=options)
        paths = {name: out / "inputs" / path.name for name, path in staged.items()}
        inputs.paths.update(fixed=str(paths["fixed"]), moving=str(paths["moving"]),
                            moving_seg=str(paths["moving_seg"]))
        timings: dict[str, float] = {"read": inputs.read_ms}
        result = register_images(inputs.fixed, inputs.moving, solver, moving_seg=inputs.moving_seg, options=options,
                                 names=inputs.names, timings_ms=timings)
        result.report["inputs"] = dict(inputs.paths)
        outputs = write_registration(result, out, qc=True, t_start=t1, overwrite=True)
        with replace_folder(out / "inputs") as folder:
            for path in staged.values():
                shutil.copyfile(path, folder / path.name)
    report = result.report
    t2 = time.perf_counter()

    reference = made["reference"]
    grid = ModelGrid.of(reference)
    mask = made["fixed_seg"] > 0
    to_voxel = np.linalg.inv(grid.index_to_physical_matrix())
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["true_displacement"]))).transpose(2, 1, 0, 3)
    field = sitk.GetArrayFromImage(sitk.ReadImage(outputs["displacement"])).transpose(2, 1, 0, 3)
    fixed_seg = sitk.ReadImage(str(paths["fixed_seg"]))
    return {
        "iterations": report["iterations"],
        "estimator_passes": report["estimator_passes"],
        "epe_before": _epe(np.zeros_like(truth), truth, mask, to_voxel),
        "epe_after": _epe(field.astype(np.float64), truth, mask, to_voxel),
        "dice_before": _dice(fixed_seg, sitk.ReadImage(str(paths["moving_seg"]))),
        "dice_after": _dice(fixed_seg, sitk.ReadImage(outputs["warped_seg"])),
        "folding_fraction": report["folding_fraction"],
        "seconds": {"export": t1 - t0, "register": t2 - t1, "total": time.perf_counter() - t0},
        "engines": str(engines),
        "outputs": {**outputs, **{f"input_{k}": str(v) for k, v in paths.items()}},
        "report": report,
    }
