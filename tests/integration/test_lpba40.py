"""Full-size real-data registrations (marker ``slow``; CI runs them).

The released Mindboggle checkpoint on the LPBA40 pair S05 (fixed) / S20
(moving): Dice over the 48 labels both share must rise from the affine-only
value (~0.45) above 0.60 with RP-Net and higher again with IIRP-Net
(``official``); the exported onnxruntime engine must reproduce the PyTorch
reference (iterations, flow through all five stages, Dice); the result must not
depend on how the fixed image is stored; and raw native scans with ``--affine``
must come out on their own grid. To fit CI, the registrations run on the
onnxruntime engine and the reference runs once, with the ``rpnet`` rule (every
stage, one pass each); the reference's ``official`` iterations on this pair,
[1, 2, 2, 1] (benchmarks/results/cpu_engines.md), are pinned for the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from iirp import metrics
from iirp.metrics import label_dice
from iirp.runtime import RegistrationOptions, TorchSolver, register_files, register_images
from iirp.runtime.geometry import ModelGrid, orient, same_grid
from iirp.runtime.imageio import read_image, read_labels

pytestmark = pytest.mark.slow


def mean_dice(reference: sitk.Image, candidate: sitk.Image, labels: np.ndarray) -> float:
    """Mean Dice over ``labels`` (:func:`iirp.metrics.label_dice`, SimpleITK's label overlap filter)."""
    return float(np.mean(list(label_dice(reference, candidate, labels).values())))


def shared_labels(a: sitk.Image, b: sitk.Image) -> np.ndarray:
    return metrics.shared_labels(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.fixture(scope="module")
def solver(shared_data: Path) -> TorchSolver:
    return TorchSolver(shared_data / "mindboggle" / "mind.pt")


@pytest.fixture(scope="module")
def brain(shared_data: Path) -> dict[str, Path]:
    d = shared_data / "brain"
    return {
        "fixed": d / "LPBA40_S05_vol.nii.gz",
        "moving": d / "LPBA40_S20_vol.nii.gz",
        "fixed_seg": d / "LPBA40_S05_seg.nii.gz",
        "moving_seg": d / "LPBA40_S20_seg.nii.gz",
    }


def _register_canonical(solver, brain: dict[str, Path], out: Path, rule: str):  # type: ignore[no-untyped-def]
    report = register_files(
        brain["fixed"], brain["moving"], solver, out, moving_seg=brain["moving_seg"],
        options=RegistrationOptions(iterstop=rule),
    )
    return out, report


@pytest.fixture(scope="module")
def canonical_rpnet(ort_solver, brain: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """RP-Net on the onnxruntime engine (the engine is checked against the reference below)."""
    return _register_canonical(ort_solver, brain, tmp_path_factory.mktemp("rpnet"), "rpnet")


@pytest.fixture(scope="module")
def canonical_official(ort_solver, brain: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """IIRP-Net (official rule) on the onnxruntime engine."""
    return _register_canonical(ort_solver, brain, tmp_path_factory.mktemp("official"), "official")


#: The PyTorch reference's official iterations (levels 4..1) on S05 <- S20 (cpu_engines.md, the core tests).
REFERENCE_OFFICIAL_ITERATIONS = [1, 2, 2, 1]


@pytest.fixture(scope="module")
def exported(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from iirp.export import export_checkpoint

    # torchscript: about a minute at full size on 2 cores; the default dynamo path is covered by tests/export
    out = tmp_path_factory.mktemp("engines") / "fp32"
    export_checkpoint(shared_data / "mindboggle" / "mind.pt", out, verify=False, progress=False, exporter="torchscript")
    return out


@pytest.fixture(scope="module")
def ort_solver(exported: Path):  # type: ignore[no-untyped-def]
    from iirp.runtime.pipeline import EngineSolver

    return EngineSolver(exported, "ort")


def test_rpnet_and_iirp_raise_dice_over_affine_only(
    brain: dict[str, Path], canonical_rpnet, canonical_official
) -> None:
    fixed_seg = sitk.ReadImage(str(brain["fixed_seg"]))
    moving_seg = sitk.ReadImage(str(brain["moving_seg"]))
    labels = shared_labels(fixed_seg, moving_seg)
    assert len(labels) == 48
    affine_only = mean_dice(fixed_seg, moving_seg, labels)
    assert 0.44 < affine_only < 0.46

    rp_out, rp_report = canonical_rpnet
    assert rp_report["iterations"] == [1, 1, 1, 1]
    assert rp_report["model_grid"]["voxel_for_voxel"] is True
    rpnet = mean_dice(fixed_seg, sitk.ReadImage(str(rp_out / "warped_seg.nii.gz")), labels)

    out, report = canonical_official
    iirp = mean_dice(fixed_seg, sitk.ReadImage(str(out / "warped_seg.nii.gz")), labels)
    print(f"Dice affine-only {affine_only:.4f}  rpnet {rpnet:.4f}  official {iirp:.4f} {report['iterations']}")
    assert rpnet > 0.60
    assert iirp > rpnet + 0.003
    assert report["iterations"] == REFERENCE_OFFICIAL_ITERATIONS
    assert report["estimator_passes"] >= sum(report["iterations"])
    assert 0.0 <= report["folding_fraction"] < 0.05


def _restore_elsewhere(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with permuted and flipped axes (hence another origin)."""
    permuted = sitk.PermuteAxes(image, [2, 0, 1])
    return sitk.Flip(permuted, [True, False, True])


#: Only the coarsest estimator: the geometry is under test, not the network, and this keeps it cheap.
LAYOUT_RULE = "fixed:1,0,0,0"


def test_result_does_not_depend_on_the_fixed_layout(ort_solver, brain: dict[str, Path], tmp_path: Path) -> None:
    """The same fixed image stored with permuted and flipped axes gives the same field, on its own grid.

    In memory (:func:`register_images`): writing the outputs is covered by the other tests here.
    """
    fixed = read_image(brain["fixed"], "fixed")
    restored = _restore_elsewhere(fixed)
    assert not same_grid(restored, fixed) and restored.GetOrigin() != fixed.GetOrigin()
    # physically the same image: the voxel at a physical point is unchanged
    point = fixed.TransformIndexToPhysicalPoint((40, 100, 70))
    assert restored.GetPixel(restored.TransformPhysicalPointToIndex(point)) == fixed.GetPixel((40, 100, 70))
    sitk.WriteImage(restored, str(tmp_path / "fixed.nrrd"))
    moving = read_image(brain["moving"], "moving")
    moving_seg = read_labels(brain["moving_seg"], "moving-seg")
    results = {}
    for name, fixed_image in (("canonical", fixed), ("relayout", read_image(tmp_path / "fixed.nrrd", "fixed"))):
        results[name] = register_images(fixed_image, moving, ort_solver, moving_seg=moving_seg,
                                        options=RegistrationOptions(iterstop=LAYOUT_RULE))
        assert results[name].report["model_grid"]["voxel_for_voxel"] is True  # reorientation is lossless
    relayout, canonical = results["relayout"], results["canonical"]
    for name in ("warped", "field", "warped_seg"):
        assert same_grid(getattr(relayout, name), restored), name

    # back in the canonical layout, every output is the canonical run's (the field: up to float32 rounding)
    for name in ("field", "warped_seg"):
        back, image = orient(getattr(relayout, name)), getattr(canonical, name)
        assert same_grid(back, image)
        a, b = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image)
        if name == "warped_seg":
            assert np.mean(a != b) < 1e-4, name  # nearest-neighbour ties may break differently
        else:
            assert np.abs(a - b).max() < 1e-4, name


def test_native_scans_with_affine(ort_solver, shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "native"
    fixed_path, moving_path = d / "LPBA40_S05_native.nii.gz", d / "LPBA40_S20_native.nii.gz"
    fixed_seg = sitk.ReadImage(str(d / "LPBA40_S05_native_labels.nii.gz"))
    moving_seg = sitk.ReadImage(str(d / "LPBA40_S20_native_labels.nii.gz"))
    labels = shared_labels(fixed_seg, moving_seg)
    identity = mean_dice(fixed_seg, moving_seg, labels)
    assert identity < 0.1

    report = register_files(
        fixed_path, moving_path, ort_solver, tmp_path, moving_seg=d / "LPBA40_S20_native_labels.nii.gz",
        options=RegistrationOptions(iterstop="rpnet", affine=True),  # the geometry is under test; rpnet is cheaper
    )
    assert report["model_grid"]["voxel_for_voxel"] is False
    assert report["pre_alignment"] == "affine"
    assert report["timings_ms"]["affine"] < 60_000

    fixed = sitk.ReadImage(str(fixed_path))
    warped = sitk.ReadImage(str(tmp_path / "warped.nii.gz"))
    field = sitk.ReadImage(str(tmp_path / "displacement.nii.gz"))
    warped_seg = sitk.ReadImage(str(tmp_path / "warped_seg.nii.gz"))
    for image in (warped, field, warped_seg):
        assert same_grid(image, fixed)
    assert field.GetPixelID() == sitk.sitkVectorFloat32
    assert warped_seg.GetPixelID() == moving_seg.GetPixelID()
    assert isinstance(sitk.ReadTransform(str(tmp_path / "affine.tfm")), sitk.Transform)

    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    again = sitk.Resample(
        moving, fixed, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)),
        sitk.sitkLinear, 0.0, sitk.sitkFloat32,
    )
    span = float(np.ptp(sitk.GetArrayViewFromImage(moving)))
    diff = np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(warped)).max()
    assert diff <= 1e-3 * span

    dice = mean_dice(fixed_seg, warped_seg, labels)
    print(f"native: identity Dice {identity:.4f}, RP-Net with --affine {dice:.4f}, {report['iterations']}")
    assert dice >= 0.55
    assert ModelGrid(**{k: tuple(v) for k, v in report["model_grid"].items() if k != "voxel_for_voxel"}).size == (
        160, 192, 160,
    )


def test_released_checkpoint_exports_at_full_size(shared_data: Path, exported: Path) -> None:
    """Manifest of the released checkpoint's export; parity on the two coarse estimators.

    The full-resolution stages take minutes in PyTorch on two cores (``iirp-export`` verifies
    them all by default); the pipeline test below covers them end to end.
    """
    import onnxruntime as ort
    import torch

    from iirp.export import FP32_TOLERANCE
    from iirp.manifest import Manifest, sha256_file
    from iirp.model import load_checkpoint

    size = (160, 192, 160)
    ckpt = shared_data / "mindboggle" / "mind.pt"
    manifest = Manifest.load(exported)
    manifest.verify_files(exported)
    assert manifest.source_sha256 == sha256_file(ckpt)
    assert manifest.size == size and manifest.model["n_parameters"] == 419_964 and manifest.model["n_resblocks"] == 2
    assert manifest.stages["flow_estimator_1"].outputs[0].shape == [1, 3, *size]

    net = load_checkpoint(ckpt)[0]
    rng = np.random.default_rng(0)
    for level, channels in ((4, 32), (3, 32)):
        dims = tuple(s // 2 ** (level - 1) for s in size)
        moving, fixed = (rng.random((1, channels, *dims), dtype=np.float32) for _ in range(2))
        session = ort.InferenceSession(str(exported / f"flow_estimator_{level}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"moving_features": moving, "fixed_features": fixed})[0]
        with torch.inference_mode():
            ref = net.estimator(level)(torch.from_numpy(moving), torch.from_numpy(fixed)).numpy()
        assert got.shape == (1, 3, *dims)
        assert float(np.abs(got - ref).max()) <= FP32_TOLERANCE.limit(float(np.abs(ref).max()))


def test_onnxruntime_engine_matches_the_reference(
    brain: dict[str, Path], canonical_rpnet, solver: TorchSolver
) -> None:
    """Every stage at full size, end to end: the engine's RP-Net registration is the reference's.

    The reference runs in memory (:func:`register_images`); the engine's run is the written one.
    """
    moving_seg = read_labels(brain["moving_seg"], "moving-seg")
    ref = register_images(read_image(brain["fixed"], "fixed"), read_image(brain["moving"], "moving"), solver,
                          moving_seg=moving_seg, options=RegistrationOptions(iterstop="rpnet"))
    out, report = canonical_rpnet
    assert report["engine"] == "ort" and ref.report["engine"] == "torch"
    assert report["iterations"] == ref.report["iterations"]
    assert report["estimator_passes"] == ref.report["estimator_passes"]
    # 1 mm RAS grid: the field in mm differs from the flow in voxels only by axis signs
    ref_field = sitk.GetArrayFromImage(ref.field)
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    flow_error = float(np.abs(field - ref_field).max())
    fixed_seg = sitk.ReadImage(str(brain["fixed_seg"]))
    labels = shared_labels(fixed_seg, moving_seg)
    ref_dice = mean_dice(fixed_seg, ref.warped_seg, labels)
    dice = mean_dice(fixed_seg, sitk.ReadImage(str(out / "warped_seg.nii.gz")), labels)
    print(f"ort vs torch: max flow error {flow_error:.2e} voxel, Dice {dice:.5f} vs {ref_dice:.5f}")
    assert flow_error < 1e-3
    assert abs(dice - ref_dice) < 0.001
