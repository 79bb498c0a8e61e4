"""iirp-train (iirp.model.training): loss falls, exact resume, released checkpoints, --init, errors, CLI."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from support import blob, write_array

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from iirp.cli import train_app  # noqa: E402
from iirp.errors import CheckpointError, IirpError, ImageError  # noqa: E402
from iirp.model import RPNet, load_checkpoint  # noqa: E402
from iirp.model.errors import ResumeError, TrainingDataError, TrainingError  # noqa: E402
from iirp.model.losses import diffusion, local_ncc  # noqa: E402
from iirp.model.training import LOG_COLUMNS, TrainConfig, train  # noqa: E402

SHAPE = (16, 16, 16)
VOL = (20, 20, 20)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three blob volumes (20^3, 1 mm; resampled onto the 16^3 model grid) in a folder."""
    root = tmp_path_factory.mktemp("train_data")
    for i, centre in enumerate(((9.0, 10.0, 9.5), (10.5, 9.0, 10.0), (9.5, 11.0, 10.5))):
        write_array(blob(centre, sigma=3.5, shape=VOL) + 0.5 * blob((5.0, 14.0, 12.0), 2.0, VOL), root / f"v{i}.nii.gz")
    return root


def _config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(shape=SHAPE, steps=6, val_every=3, seed=0, progress=False)
    base.update(kw)
    return TrainConfig(data, out, **base)  # type: ignore[arg-type]


def _log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- losses


def test_local_ncc_and_diffusion_analytic() -> None:
    a = torch.rand(1, 1, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    assert local_ncc(a, a).item() == pytest.approx(1.0, abs=1e-3)
    assert local_ncc(a, 2.0 * a).item() == pytest.approx(1.0, abs=1e-3)  # invariant to gain (zeros pad the border)
    assert local_ncc(a, torch.rand_like(a)).item() < 0.5
    flow = torch.zeros(1, 3, 6, 6, 6)
    assert diffusion(flow).item() == 0.0
    flow[:, 0] = torch.arange(6.0).view(6, 1, 1)  # slope 1 along axis 0 only
    assert diffusion(flow).item() == pytest.approx(1.0 / 3.0 / 3.0)  # one of 3 components, one of 3 axes
    with pytest.raises(ValueError, match=r"local_ncc\(\) 'window' must be a positive odd"):
        local_ncc(a, a, window=4)
    with pytest.raises(ValueError, match=r"diffusion\(\) 'flow' must have shape"):
        diffusion(torch.zeros(1, 2, 4, 4, 4))


# --------------------------------------------------------------------------- training


def test_loss_falls(data: Path, tmp_path: Path) -> None:
    losses: list[float] = []
    train(_config(data, tmp_path / "run", steps=12, val_every=12, lr=2e-3, lam=0.1, window=5),
          on_step=lambda row: losses.append(row["loss"]))
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_resume_is_exact(data: Path, tmp_path: Path) -> None:
    kw = dict(synthetic=True, flip=True, jitter=0.1, val_every=2)
    straight = train(_config(data, tmp_path / "a", steps=4, **kw))
    train(_config(data, tmp_path / "b", steps=2, **kw))
    resumed = train(_config(data, tmp_path / "b", steps=4, resume=True, **kw))
    assert (straight["steps"], resumed["steps"], resumed["resumed_from"]) == (4, 4, 2)
    for name in ("latest.pt", "best.pt"):
        sa, sb = (torch.load(tmp_path / d / name, weights_only=True)["model_state"] for d in ("a", "b"))
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)
    log_a, log_b = _log(tmp_path / "a" / "log.csv"), _log(tmp_path / "b" / "log.csv")
    assert [r["step"] for r in log_b] == [str(i) for i in range(1, 5)]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(log_a) == drop(log_b)
    assert list(log_a[0]) == list(LOG_COLUMNS)


def test_supervised_term_is_the_end_point_error(data: Path, tmp_path: Path) -> None:
    """Synthetic pairs log the end-point error to their true flow; --supervised W adds W x EPE to the loss."""
    rows: list[dict] = []
    train(_config(data, tmp_path / "run", steps=3, val_every=3, synthetic=True, supervised=2.0, lam=0.5),
          on_step=rows.append)
    for row in rows:
        assert row["epe"] > 0
        assert row["loss"] == pytest.approx(-row["ncc"] + 0.5 * row["diffusion"] + 2.0 * row["epe"], rel=1e-5)
    plain: list[dict] = []
    train(_config(data, tmp_path / "real", steps=1, val_every=1), on_step=plain.append)
    assert plain[0]["epe"] is None and _log(tmp_path / "real" / "log.csv")[0]["epe"] == ""


def test_checkpoint_loads_and_exports(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from iirp.export import export_checkpoint
    from iirp.manifest import Manifest

    out = tmp_path / "run"
    train(_config(data, out, steps=2, val_every=2))
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["config"] == {"size": SHAPE, "in_channel": 1, "first_channel": 8}
    net, info = load_checkpoint(out / "latest.pt")
    assert (info.format, info.size, info.n_resblocks) == ("released", SHAPE, 2)
    assert (info.spacing, info.orientation, info.intensity) == ((1.0, 1.0, 1.0), "RAS", "minmax")  # the grid record
    assert set(saved["model_state"]) == set(RPNet().state_dict())
    manifest = export_checkpoint(out / "latest.pt", tmp_path / "engines", exporter="torchscript", verify=False,
                                 progress=False)
    assert manifest.size == SHAPE and Manifest.load(tmp_path / "engines").source_sha256 == info.sha256


def test_validation_dice_picks_best(data: Path, tmp_path: Path) -> None:
    seg = np.zeros(VOL, np.int16)
    seg[6:14, 6:14, 6:14] = 1
    seg[8:12, 8:12, 8:12] = 2
    write_array(seg, tmp_path / "seg.nii.gz")
    val = tmp_path / "val.csv"
    val.write_text(f"fixed,moving,fixed_seg,moving_seg\n{data / 'v0.nii.gz'},{data / 'v1.nii.gz'},"
                   f"{tmp_path / 'seg.nii.gz'},{tmp_path / 'seg.nii.gz'}\n")
    summary = train(_config(data, tmp_path / "run", steps=4, val_every=2, val=val))
    rows = _log(tmp_path / "run" / "log.csv")
    dice = [float(r["val_dice"]) for r in rows if r["val_dice"]]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice)
    assert summary["best_metric"] == "val_dice" and summary["best"] == pytest.approx(max(dice), abs=1e-7)


def _released(tmp_path: Path, n_resblocks: int = 2) -> tuple[Path, dict]:
    torch.manual_seed(5)
    net = RPNet(n_resblocks=n_resblocks, size=SHAPE)
    path = tmp_path / f"released{n_resblocks}.pt"
    torch.save({"config": {"size": SHAPE, "in_channel": 1, "first_channel": 8}, "model_state": net.state_dict()},
               path)
    return path, net.state_dict()


@pytest.mark.parametrize("n_resblocks", [2, 1])
def test_init_keeps_released_keys(data: Path, tmp_path: Path, n_resblocks: int) -> None:
    ckpt, state = _released(tmp_path, n_resblocks)
    train(_config(data, tmp_path / "run", steps=2, val_every=2, init=ckpt, shape=None, lr=1e-3))
    saved = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert list(saved["model_state"]) == list(state)  # same keys, same order
    assert saved["config"]["size"] == SHAPE  # the --init checkpoint's grid by default
    assert any(not torch.equal(saved["model_state"][k], state[k]) for k in state)  # it trained


# --------------------------------------------------------------------------- errors


def test_bad_inputs(data: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="holds no volumes"):
        train(_config(tmp_path / "empty", tmp_path / "o1"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"not an image")
    (bad / "other.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.nii.gz"):
        train(_config(bad, tmp_path / "o2"))
    with pytest.raises(TrainingError, match="--shape must be 3 multiples of 8"):
        train(_config(data, tmp_path / "o3", shape=(16, 20, 16)))
    with pytest.raises(ResumeError, match="nothing to resume"):
        train(_config(data, tmp_path / "o4", resume=True))
    with pytest.raises(TrainingDataError, match="at least 2 volumes"):
        train(_config(data / "v0.nii.gz", tmp_path / "o5"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(_config(data, tmp_path / "o6", init=tmp_path / "junk.pt"))
    ckpt, _ = _released(tmp_path, 1)
    with pytest.raises(TrainingError, match="has 1 ResBlocks per estimator, --resblocks asks for 2"):
        train(_config(data, tmp_path / "o7", init=ckpt, resblocks=2))
    with pytest.raises(TrainingError, match="--supervised needs --synthetic"):
        train(_config(data, tmp_path / "o8", supervised=1.0))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))  # nothing written


def test_rerun_in_a_used_folder_needs_resume(data: Path, tmp_path: Path) -> None:
    train(_config(data, tmp_path / "run", steps=1, val_every=1))
    with pytest.raises(ResumeError, match="already holds a training run"):
        train(_config(data, tmp_path / "run", steps=1))
    with pytest.raises(ResumeError, match=r"options differ from the saved run: lr"):
        train(_config(data, tmp_path / "run", steps=2, lr=5e-4, resume=True))


# --------------------------------------------------------------------------- CLI


def test_cli_trains_and_reports(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(train_app, [str(data), "-o", str(out), "--shape", "16", "16", "16", "--steps", "2",
                                            "--val-every", "2", "--synthetic", "--crop", "16", "16", "16"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "trained to step 2 (from 0)" in result.stdout
    assert {p.name for p in out.iterdir()} == {"latest.pt", "best.pt", "resume.pt", "log.csv"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--shape", "16", "12", "16"], "--shape must be 3 multiples of 8"),
        (["--resume"], "nothing to resume"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(data: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    result = CliRunner().invoke(train_app, [str(data), "-o", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("iirp-train: error: ") and needle in lines[0], lines


def test_cli_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(train_app, [str(tmp_path / "empty"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "holds no volumes" in result.stderr
    assert isinstance(TrainingDataError("x"), IirpError)


# --------------------------------------------------------------------------- real data (slow)


@pytest.mark.slow
def test_finetune_released_checkpoint_on_lpba40(shared_data: Path, tmp_path: Path) -> None:
    brain = shared_data / "brain"
    listing = tmp_path / "pair.csv"
    listing.write_text(f"path\n{brain / 'LPBA40_S05_vol.nii.gz'}\n{brain / 'LPBA40_S20_vol.nii.gz'}\n")
    released = torch.load(shared_data / "mindboggle" / "mind.pt", map_location="cpu", weights_only=True)
    t0 = time.perf_counter()
    # random 32^3 windows of the full-size volumes: a full-size step takes minutes on 2 cores
    train(TrainConfig(listing, tmp_path / "run", steps=2, val_every=2, init=shared_data / "mindboggle" / "mind.pt",
                      crop=(32, 32, 32), progress=False))
    seconds = time.perf_counter() - t0
    saved = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert list(saved["model_state"]) == list(released["model_state"])
    assert saved["config"]["size"] == (160, 192, 160)
    assert any(not torch.equal(saved["model_state"][k], released["model_state"][k]) for k in saved["model_state"])
    print(f"fine-tuning 2 steps (32^3 windows of 160x192x160) took {seconds:.1f} s")  # reported, not asserted


def test_deterministic_algorithms_warn_only_on_cuda() -> None:
    """CUDA's grid_sample backward has no deterministic kernel: on CUDA the switch warns instead of raising."""
    from iirp.model.training import _Deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with _Deterministic(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    with _Deterministic(torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled()) == before


def test_missing_cuda_device_is_refused_before_reading_data(tmp_path: Path) -> None:
    from iirp.model.errors import TrainingError
    from iirp.model.training import TrainConfig, train

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU error")
    with pytest.raises(TrainingError, match=r"--device cuda: torch sees 0 CUDA device\(s\)"):
        train(TrainConfig(tmp_path / "no_data_read", tmp_path / "out", device="cuda"))
    with pytest.raises(TrainingError, match=r"--device must be 'cpu' or 'cuda\[:N\]', got 'gpu'"):
        train(TrainConfig(tmp_path / "no_data_read", tmp_path / "out", device="gpu"))
    assert not (tmp_path / "out").exists()
