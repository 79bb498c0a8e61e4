"""Unsupervised RP-Net training (SPEC section 6), checkpoints in the released format, exact resume.

Each step takes one pair (batch 1) from :class:`~iirp.model.train_data.PairSampler`, runs
:meth:`RPNet.forward` (one pass per level), warps the full-resolution moving image with the
final flow and minimises ``-local_ncc(warped, fixed) + lambda * diffusion(flow)``
(:mod:`iirp.model.losses`) with Adam; with ``supervised`` > 0 (synthetic pairs only) the
mean end-point error against the known flow, times ``supervised``, is added (not in the paper;
meant for short runs such as the demo checkpoint's, and not yet shown to help: see
benchmarks/results/demo_training.md). Tensors are ``(1, 1, X, Y, Z)`` images and
``(1, 3, X, Y, Z)`` voxel flows (see :mod:`iirp.runtime.geometry`).

Files in the output folder (each written to a temporary file, then ``os.replace``-d):

* ``latest.pt`` / ``best.pt``: released format ``{"config": {"size", "in_channel",
  "first_channel"}, "model_state": state_dict}`` (:func:`iirp.model.load_checkpoint`,
  ``iirp-export``). ``best.pt`` is the best mean validation Dice with ``val``, else the
  lowest smoothed training loss (exponential average, factor :data:`SMOOTHING`), judged at
  each checkpoint step.
* ``resume.pt``: weights, Adam state, step, best score, and every RNG state (torch, numpy's
  global generator, the pair sampler), loaded weights-only. ``resume=True`` continues from
  it bit for bit on the CPU (deterministic algorithms are switched on while training).
* ``log.csv``: one row per step: ``step, loss, ncc, diffusion, epe, lr, seconds, val_dice``
  (``epe``: mean end-point error in voxels against the true flow, synthetic pairs only)
  (``seconds``: wall time of that step; ``val_dice`` at checkpoint steps with ``val``).

Checkpoints are written every ``val_every`` steps and at the last step.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from iirp.atomic import write_file, write_text
from iirp.errors import OutputError, one_line
from iirp.metrics import dice_arrays
from iirp.model.checkpoint import RECORD_KEY
from iirp.model.errors import ResumeError, TrainingError
from iirp.model.losses import DEFAULT_WINDOW, diffusion, local_ncc
from iirp.model.rpnet import RPNet
from iirp.model.spatial import warp
from iirp.model.train_data import PairSampler, ValPair, list_volumes, load_val_pairs, load_volumes
from iirp.shapes import check_fits_in_memory, check_model_shape
from iirp.typing import PathLike

#: Lower bound of a training step's memory per voxel of the window (bytes): the forward activations
#: kept for the backward pass of both feature pyramids and all four estimators, and their gradients.
_TRAIN_BYTES = 1024

__all__ = [
    "LOG_COLUMNS",
    "SMOOTHING",
    "TrainConfig",
    "train",
    "save_released",
    "released_payload",
]

LOG_COLUMNS = ("step", "loss", "ncc", "diffusion", "epe", "lr", "seconds", "val_dice")
#: Factor of the exponential average of the training loss that picks ``best.pt`` without validation.
SMOOTHING = 0.98
RESUME_NAME = "resume.pt"
_RESUME_FORMAT = "iirp-train-resume/1"
#: Options that must agree between a run and its resumption.
_RESUME_KEYS = ("shape", "spacing", "lr", "lam", "window", "seed", "synthetic", "flip", "jitter",
                "max_displacement", "intensity", "crop", "supervised")


@dataclass
class TrainConfig:
    """Options of one training run (the ``iirp-train`` flags).

    Attributes:
        data: folder of volumes, CSV listing them, or one volume (see :func:`list_volumes`).
        out_dir: output folder (created).
        shape: model grid ``(X, Y, Z)`` in voxels, multiples of 8 (>= 16); default: the
            ``init`` checkpoint's size, else 160 x 192 x 160.
        spacing: model grid spacing in mm (isotropic).
        steps: total number of steps (a resumed run continues up to it).
        lr: Adam learning rate.
        lam: weight of the diffusion term.
        window: local NCC window side in voxels.
        resblocks: ResBlocks per estimator (default 2, or the ``init`` checkpoint's).
        init: released checkpoint to fine-tune (its keys are kept exactly).
        resume: continue the run in ``out_dir``.
        val: validation CSV (``fixed, moving, fixed_seg, moving_seg``).
        val_every: validation and checkpoint interval in steps.
        seed: seeds torch (initial weights) and the pair sampler.
        synthetic: train on synthetic deformations of each volume (:mod:`iirp.synthetic`).
        flip: random flips of each pair.
        jitter: random gamma strength per image.
        max_displacement: synthetic deformation bound in voxels.
        supervised: weight of the mean end-point error (voxels) between the predicted and the
            true flow, added to the loss (synthetic pairs only; 0 = the paper's unsupervised loss).
        intensity: intensity rule, as ``iirp-run --intensity``.
        crop: optional ``(x, y, z)`` random training window (multiples of 8) cut from each pair;
            checkpoints keep the model grid ``shape``.
        device: ``cpu`` or ``cuda[:N]`` (exact resume is promised on the CPU).
        progress: show a progress bar (stderr).
    """

    data: PathLike
    out_dir: PathLike
    shape: Optional[tuple[int, int, int]] = None
    spacing: float = 1.0
    steps: int = 1000
    lr: float = 1e-4
    lam: float = 1.0
    window: int = DEFAULT_WINDOW
    resblocks: Optional[int] = None
    init: Optional[PathLike] = None
    resume: bool = False
    val: Optional[PathLike] = None
    val_every: int = 100
    seed: int = 0
    synthetic: bool = False
    flip: bool = False
    jitter: float = 0.0
    max_displacement: float = 4.0
    supervised: float = 0.0
    intensity: str = "minmax"
    crop: Optional[tuple[int, int, int]] = None
    device: str = "cpu"
    progress: bool = True


# --------------------------------------------------------------------------- files


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, then ``os.replace`` (:func:`iirp.atomic.write_file`)."""
    def _save(tmp: str) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's stream writer reports a failed write this way
            raise OutputError(f"cannot write {path}: {one_line(str(err), 200)}") from err

    write_file(path, _save)


def released_payload(net: RPNet, size: tuple[int, int, int], key_order: Optional[list[str]] = None,
                     record: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The released checkpoint dict of ``net`` (CPU tensors).

    Keys are :meth:`RPNet.state_dict`'s, in ``key_order`` first where given (the ``--init``
    checkpoint's order, so a fine-tuned file lists its keys exactly as the released one).
    ``record`` (spacing, orientation, intensity of the model grid) goes under the top-level key
    :data:`iirp.model.checkpoint.RECORD_KEY`, outside ``config`` (the authors' loader passes
    ``config`` to the model's constructor).
    """
    current = net.state_dict()
    names = [k for k in (key_order or []) if k in current]
    first = set(names)
    names += [k for k in current if k not in first]
    state = {k: current[k].detach().to("cpu").clone() for k in names}
    config = {"size": tuple(int(s) for s in size), "in_channel": 1, "first_channel": int(net.first_channel)}
    payload: dict[str, Any] = {"config": config, "model_state": state}
    if record is not None:
        payload[RECORD_KEY] = dict(record)
    return payload


def save_released(net: RPNet, size: tuple[int, int, int], path: PathLike,
                  key_order: Optional[list[str]] = None, record: Optional[dict[str, Any]] = None) -> Path:
    """Write ``net`` as a released-format checkpoint with its model-grid ``record`` (atomically); returns the path."""
    p = Path(os.fspath(path))
    _atomic_save(released_payload(net, size, key_order, record), p)
    return p


def grid_record(cfg: "TrainConfig") -> dict[str, Any]:
    """The model grid a run trains on, as a checkpoint records it: spacing (mm), orientation, intensity rule."""
    from iirp.runtime.intensity import parse_intensity

    return {"spacing": [float(cfg.spacing)] * 3, "orientation": "RAS", "intensity": parse_intensity(cfg.intensity).spec}


# --------------------------------------------------------------------------- setup


def _check_options(cfg: TrainConfig) -> None:
    if cfg.shape is not None:
        check_model_shape(cfg.shape, "--shape", TrainingError)
    if cfg.crop is not None:
        check_model_shape(cfg.crop, "--crop", TrainingError)
    window = cfg.crop if cfg.crop is not None else cfg.shape
    if window is not None:
        check_fits_in_memory(window, "--crop" if cfg.crop is not None else "--shape", bytes_per_voxel=_TRAIN_BYTES)
    checks = [
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.lam >= 0, f"--lambda must be >= 0, got {cfg.lam}"),
        (cfg.window >= 1 and cfg.window % 2 == 1, f"--window must be a positive odd number, got {cfg.window}"),
        (cfg.val_every >= 1, f"--val-every must be >= 1, got {cfg.val_every}"),
        (cfg.spacing > 0, f"--spacing must be > 0 mm, got {cfg.spacing}"),
        (cfg.jitter >= 0, f"--jitter must be >= 0, got {cfg.jitter}"),
        (cfg.max_displacement >= 0, f"--max-disp must be >= 0 voxels, got {cfg.max_displacement}"),
        (cfg.supervised >= 0, f"--supervised must be >= 0, got {cfg.supervised}"),
        (cfg.supervised == 0 or cfg.synthetic, "--supervised needs --synthetic (the true flow)"),
        (cfg.resblocks is None or 0 <= cfg.resblocks <= 8, f"--resblocks must be 0..8, got {cfg.resblocks}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)
    _check_device(cfg.device)


def _check_device(device: str) -> None:
    """``cpu`` or ``cuda[:N]`` that exists, before any data is read.

    Raises:
        TrainingError: a malformed device, or a CUDA device torch does not see.
    """
    from iirp.devices import DeviceError, parse_device

    try:
        dev = parse_device(device, "--device")
    except DeviceError as err:
        raise TrainingError(str(err)) from err
    if dev.is_cuda and (not torch.cuda.is_available() or dev.index >= torch.cuda.device_count()):
        raise TrainingError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")


def _build_net(cfg: TrainConfig) -> tuple[RPNet, tuple[int, int, int], Optional[list[str]]]:
    """Random init (seeded) or the ``init`` checkpoint; returns the net, the model grid and the init key order."""
    if cfg.init is None:
        x, y, z = (int(s) for s in (cfg.shape or (160, 192, 160)))
        shape = (x, y, z)
        torch.manual_seed(cfg.seed)
        resblocks = 2 if cfg.resblocks is None else cfg.resblocks
        return RPNet(n_resblocks=resblocks, size=shape), shape, None
    from iirp.model.checkpoint import load_checkpoint

    net, info = load_checkpoint(cfg.init)
    if cfg.resblocks is not None and cfg.resblocks != info.n_resblocks:
        raise TrainingError(
            f"--init checkpoint {cfg.init} has {info.n_resblocks} ResBlocks per estimator, --resblocks asks for "
            f"{cfg.resblocks}"
        )
    if info.first_channel != 8:
        raise TrainingError(f"--init checkpoint {cfg.init} has first_channel {info.first_channel}; training needs 8")
    x, y, z = (int(s) for s in (cfg.shape or info.size))
    net.size = (x, y, z)
    torch.manual_seed(cfg.seed)
    return net, (x, y, z), list(info.keys)


def _prepare_out(cfg: TrainConfig) -> Path:
    from iirp.runtime.imageio import check_output_dir

    out = check_output_dir(cfg.out_dir)
    resume_file = out / RESUME_NAME
    if cfg.resume and not resume_file.is_file():
        raise ResumeError(f"--resume: nothing to resume in {out} (no {RESUME_NAME})")
    if not cfg.resume and resume_file.exists():
        raise ResumeError(f"{out} already holds a training run ({RESUME_NAME}); pass --resume or choose another folder")
    return out


def _signature(cfg: TrainConfig, shape: tuple[int, int, int]) -> dict[str, Any]:
    values = asdict(cfg)
    values["shape"] = list(shape)
    values["crop"] = list(cfg.crop) if cfg.crop is not None else None
    return {k: values[k] for k in _RESUME_KEYS}


# --------------------------------------------------------------------------- validation


def _validate(net: RPNet, pairs: list[ValPair], device: torch.device) -> float:
    """Mean over pairs of the mean Dice over labels, RP-Net single pass, nearest label warp."""
    net.eval()
    means = []
    with torch.no_grad():
        for pair in pairs:
            fixed = torch.from_numpy(pair.fixed)[None, None].to(device)
            moving = torch.from_numpy(pair.moving)[None, None].to(device)
            flow = net(moving, fixed)
            seg = torch.from_numpy(pair.moving_seg.astype(np.float32))[None, None].to(device)
            warped = warp(seg, flow, mode="nearest")[0, 0].round().to("cpu").numpy().astype(np.int64)
            scores = dice_arrays(pair.fixed_seg, warped)
            means.append(float(np.mean(list(scores.values()))) if scores else 0.0)
    net.train()
    return float(np.mean(means))


# --------------------------------------------------------------------------- loop


@dataclass
class _State:
    step: int = 0
    best: Optional[float] = None  # higher is better (Dice, or minus the smoothed loss)
    smoothed: Optional[float] = None


def _rng_states(sampler: PairSampler) -> dict[str, Any]:
    state: Any = np.random.get_state()  # the legacy tuple
    numpy_state = {"name": state[0], "key": [int(k) for k in state[1]], "pos": int(state[2]),
                   "has_gauss": int(state[3]), "cached_gaussian": float(state[4])}
    return {"torch": torch.get_rng_state(), "numpy": json.dumps(numpy_state), "sampler": sampler.state()}


def _set_rng_states(states: dict[str, Any], sampler: PairSampler) -> None:
    torch.set_rng_state(states["torch"])
    n = json.loads(states["numpy"])
    np.random.set_state((n["name"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    sampler.set_state(states["sampler"])


def _save_resume(path: Path, net: RPNet, opt: torch.optim.Optimizer, state: _State, sampler: PairSampler,
                 signature: dict[str, Any]) -> None:
    _atomic_save({
        "format": _RESUME_FORMAT,
        "step": state.step,
        "best": state.best,
        "smoothed": state.smoothed,
        "model_state": {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()},
        "optimizer_state": opt.state_dict(),
        "rng": _rng_states(sampler),
        "signature": json.dumps(signature, sort_keys=True),
    }, path)


def _load_resume(path: Path, net: RPNet, opt: torch.optim.Optimizer, sampler: PairSampler,
                 signature: dict[str, Any]) -> _State:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise ResumeError(f"cannot read resume state {path}: {str(err).splitlines()[0] if str(err) else err}") from err
    if not isinstance(saved, dict) or saved.get("format") != _RESUME_FORMAT:
        raise ResumeError(f"{path} is not an iirp-train resume file")
    old = json.loads(saved["signature"])
    changed = [f"{k} {old.get(k)!r} -> {signature[k]!r}" for k in signature if old.get(k) != signature[k]]
    if changed:
        raise ResumeError(f"--resume: options differ from the saved run: {'; '.join(changed)}")
    try:
        net.load_state_dict(saved["model_state"], strict=True)
    except RuntimeError as err:
        raise ResumeError(f"--resume: saved weights in {path} do not match the model") from err
    opt.load_state_dict(saved["optimizer_state"])
    _set_rng_states(saved["rng"], sampler)
    return _State(int(saved["step"]), saved["best"], saved["smoothed"])


def _format_row(row: dict[str, Any]) -> list[str]:
    out = []
    for key in LOG_COLUMNS:
        value = row.get(key)
        if value is None:
            out.append("")
        elif isinstance(value, int):
            out.append(str(value))
        else:
            out.append(f"{value:.8g}")
    return out


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to ``last_step`` (a resumed run rewrites the rest)."""
    rows: list[list[str]] = []
    if path.is_file():
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh)][1:]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    writer.writerows(r for r in rows if r and r[0].isdigit() and int(r[0]) <= last_step)
    write_text(path, buf.getvalue())


class _Progress:
    """A rich progress bar with the loss terms on stderr; plain lines at checkpoints off a terminal."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._console: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._console = Console(stderr=True)
        if self._console.is_terminal:
            self._bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[terms]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self._console,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, terms="")
            self._bar.start()

    def update(self, step: int, terms: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, terms=terms)

    def log(self, message: str) -> None:
        if self._console is not None:
            self._console.print(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class _Deterministic:
    """Switch on ``torch.use_deterministic_algorithms`` for the block, restoring the previous setting.

    On the CPU every op RP-Net training uses has a deterministic kernel, so a run (and ``--resume``)
    is exact. On CUDA the backward of ``grid_sample`` has none: deterministic algorithms are used
    where PyTorch has them (``warn_only``, a warning in the log instead of an error), so a CUDA run
    is not bit-reproducible.
    """

    def __init__(self, device: torch.device) -> None:
        self.warn_only = device.type == "cuda"

    def __enter__(self) -> None:
        self._previous = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
        if self.warn_only:  # cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=self.warn_only)

    def __exit__(self, *exc: object) -> None:
        torch.use_deterministic_algorithms(self._previous[0], warn_only=self._previous[1])


def _steps(sampler: PairSampler, device: torch.device
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """``(fixed, moving, true_flow)`` per step: ``(1, 1, X, Y, Z)`` twice, then ``(1, 3, X, Y, Z)`` or None."""
    while True:
        pair = sampler.next()
        flow = None if pair.flow is None else torch.from_numpy(np.ascontiguousarray(pair.flow))[None].to(device)
        yield (torch.from_numpy(np.ascontiguousarray(pair.fixed))[None, None].to(device),
               torch.from_numpy(np.ascontiguousarray(pair.moving))[None, None].to(device), flow)


def train(config: TrainConfig, on_step: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Run (or resume) a training run; see the module docstring for what is written.

    Args:
        config: the options.
        on_step: called after each step with its log row (a dict over :data:`LOG_COLUMNS`).

    Returns:
        Summary: ``steps`` (last step), ``resumed_from``, ``loss`` (last), ``smoothed_loss``,
        ``best`` (Dice or smoothed loss), ``best_metric``, ``seconds``, ``outputs`` (paths).

    Raises:
        TrainingError: bad option or ``init`` checkpoint; TrainingDataError: bad data;
        ResumeError: nothing (or something else) to resume; ImageError / CheckpointError:
        unreadable volume or checkpoint. Nothing is written before the data is loaded.
    """
    cfg = config
    _check_options(cfg)
    out = _prepare_out(cfg)
    net, shape, key_order = _build_net(cfg)
    device = torch.device(cfg.device)
    paths = list_volumes(cfg.data)
    volumes = load_volumes(paths, shape, cfg.spacing, cfg.intensity)
    sampler = PairSampler(volumes, cfg.seed, synthetic=cfg.synthetic, flip=cfg.flip, jitter=cfg.jitter,
                          max_displacement=cfg.max_displacement, crop=cfg.crop)
    val_pairs = load_val_pairs(cfg.val, shape, cfg.spacing, cfg.intensity) if cfg.val is not None else None
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    signature = _signature(cfg, shape)
    state = _State()
    if cfg.resume:
        state = _load_resume(out / RESUME_NAME, net, opt, sampler, signature)
    resumed_from = state.step
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.csv"
    _truncate_log(log_path, state.step)
    outputs = {"latest": str(out / "latest.pt"), "best": str(out / "best.pt"), "resume": str(out / RESUME_NAME),
               "log": str(log_path)}

    record = grid_record(cfg)
    progress = _Progress(cfg.progress, cfg.steps, state.step)
    t_start = time.perf_counter()
    last: dict[str, Any] = {}
    try:
        with _Deterministic(device), open(log_path, "a", newline="") as log_fh:
            writer = csv.writer(log_fh, lineterminator="\n")
            batches = _steps(sampler, device)
            while state.step < cfg.steps:
                t0 = time.perf_counter()
                fixed, moving, true_flow = next(batches)
                flow = net(moving, fixed)
                similarity = local_ncc(warp(moving, flow), fixed, cfg.window)
                smooth = diffusion(flow)
                loss = -similarity + cfg.lam * smooth
                epe = None
                if true_flow is not None:  # logged always; in the graph only when it is a loss term
                    with torch.set_grad_enabled(cfg.supervised > 0):
                        epe = torch.linalg.vector_norm(flow - true_flow, dim=1).mean()
                    if cfg.supervised > 0:
                        loss = loss + cfg.supervised * epe
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state.step += 1
                value = float(loss.detach())
                state.smoothed = value if state.smoothed is None else \
                    SMOOTHING * state.smoothed + (1.0 - SMOOTHING) * value
                row: dict[str, Any] = {"step": state.step, "loss": value, "ncc": float(similarity.detach()),
                                       "diffusion": float(smooth.detach()), "lr": cfg.lr,
                                       "epe": None if epe is None else float(epe.detach())}
                checkpoint = state.step % cfg.val_every == 0 or state.step == cfg.steps
                if checkpoint and val_pairs is not None:
                    row["val_dice"] = _validate(net, val_pairs, device)
                row["seconds"] = time.perf_counter() - t0
                writer.writerow(_format_row(row))
                log_fh.flush()
                last = row
                terms = f"loss {value:.4f} ncc {row['ncc']:.4f} diff {row['diffusion']:.4f}"
                if row["epe"] is not None:
                    terms += f" epe {row['epe']:.3f}"
                progress.update(state.step, terms)
                if on_step is not None:
                    on_step(row)
                if checkpoint:
                    score = row["val_dice"] if val_pairs is not None else -float(state.smoothed)
                    if state.best is None or score > state.best:
                        state.best = score
                        save_released(net, shape, outputs["best"], key_order, record)
                    save_released(net, shape, outputs["latest"], key_order, record)
                    _save_resume(out / RESUME_NAME, net, opt, state, sampler, signature)
                    extra = f" val dice {row['val_dice']:.4f}" if val_pairs is not None else ""
                    if progress._bar is None:
                        progress.log(f"step {state.step}/{cfg.steps}: {terms}{extra}")
    finally:
        progress.close()
    return {
        "steps": state.step,
        "resumed_from": resumed_from,
        "loss": last.get("loss"),
        "smoothed_loss": state.smoothed,
        "best": state.best if val_pairs is not None or state.best is None else -state.best,
        "best_metric": "val_dice" if val_pairs is not None else "smoothed_loss",
        "seconds": time.perf_counter() - t_start,
        "model_grid": list(shape),
        "outputs": outputs,
    }
