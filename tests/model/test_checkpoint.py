"""Checkpoint loading (SPEC 2): released format and bare state dicts, strict and weights-only."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from iirp.errors import CheckpointError, IirpError  # noqa: E402
from iirp.model import CheckpointInfo, RPNet, load_checkpoint, load_state_dict, sha256_file  # noqa: E402

RELEASED = Path("/work/shared/data/mindboggle/mind.pt")
RELEASED_N_PARAMETERS = 419964
RELEASED_N_RESBLOCKS = 2
TINY_SIZE = (32, 32, 32)


def _released_payload(net: RPNet, size: tuple[int, int, int] = TINY_SIZE) -> dict:
    return {"config": {"size": size, "in_channel": 1, "first_channel": 8}, "model_state": net.state_dict()}


@pytest.fixture(scope="module")
def tiny_net() -> RPNet:
    torch.manual_seed(0)
    return RPNet(size=TINY_SIZE).eval()


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_net: RPNet) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(_released_payload(tiny_net), path)
    return path


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- accepted formats


def test_released_format_round_trip(tiny_ckpt: Path, tiny_net: RPNet) -> None:
    net, info = load_checkpoint(tiny_ckpt)
    assert isinstance(net, RPNet)
    assert isinstance(info, CheckpointInfo)
    assert not net.training
    assert info.format == "released"
    assert info.size == TINY_SIZE
    assert net.size == TINY_SIZE
    assert info.n_resblocks == 2
    assert info.first_channel == 8
    assert info.path == str(tiny_ckpt)
    assert info.sha256 == sha256_file(tiny_ckpt)
    assert len(info.sha256) == 64
    assert info.n_parameters == sum(p.numel() for p in tiny_net.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())
    _assert_same_weights(net, tiny_net)


def test_bare_state_dict_round_trip(tmp_path: Path, tiny_net: RPNet) -> None:
    path = tmp_path / "bare.pt"
    torch.save(tiny_net.state_dict(), path)
    net, info = load_checkpoint(path)
    assert info.format == "state_dict"
    assert info.n_resblocks == 2
    # no config: the model grid falls back to the released Mindboggle size
    assert info.size == (160, 192, 160)
    _assert_same_weights(net, tiny_net)


def test_bare_state_dict_size_override(tmp_path: Path, tiny_net: RPNet) -> None:
    path = tmp_path / "bare.pt"
    torch.save(tiny_net.state_dict(), path)
    net, info = load_checkpoint(path, size=TINY_SIZE)
    assert info.size == TINY_SIZE
    assert net.size == TINY_SIZE


def test_grid_buffers_are_ignored(tmp_path: Path, tiny_net: RPNet) -> None:
    state = dict(tiny_net.state_dict())
    state["spatial_transform.grid"] = torch.zeros(1, 3, 4, 4, 4)
    state["decoder1.warp.grid"] = torch.zeros(1, 3, 2, 2, 2)
    path = tmp_path / "with_grid.pt"
    torch.save(state, path)
    net, info = load_checkpoint(path, size=TINY_SIZE)
    assert info.format == "state_dict"
    _assert_same_weights(net, tiny_net)


def test_grid_buffers_are_ignored_in_released_format(tmp_path: Path, tiny_net: RPNet) -> None:
    payload = _released_payload(tiny_net)
    payload["model_state"] = dict(payload["model_state"], **{"stn.grid": torch.zeros(3)})
    path = tmp_path / "with_grid.pt"
    torch.save(payload, path)
    net, _ = load_checkpoint(path)
    _assert_same_weights(net, tiny_net)


def test_dataparallel_prefix_is_removed(tmp_path: Path, tiny_net: RPNet) -> None:
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in tiny_net.state_dict().items()}, path)
    net, _ = load_checkpoint(path, size=TINY_SIZE)
    _assert_same_weights(net, tiny_net)


@pytest.mark.parametrize("n_resblocks", [0, 1, 2, 3])
def test_resblock_count_is_inferred(tmp_path: Path, n_resblocks: int) -> None:
    torch.manual_seed(n_resblocks)
    original = RPNet(n_resblocks=n_resblocks, size=TINY_SIZE)
    path = tmp_path / f"res{n_resblocks}.pt"
    torch.save(original.state_dict(), path)
    net, info = load_checkpoint(path, size=TINY_SIZE)
    assert info.n_resblocks == n_resblocks
    assert net.n_resblocks == n_resblocks
    assert info.n_parameters == sum(p.numel() for p in original.parameters())
    _assert_same_weights(net, original)


@pytest.mark.parametrize("n_resblocks", [0, 2, 3])
def test_load_state_dict_infers_resblocks(n_resblocks: int) -> None:
    original = RPNet(n_resblocks=n_resblocks, size=TINY_SIZE)
    net = load_state_dict(original.state_dict(), size=TINY_SIZE)
    assert net.n_resblocks == n_resblocks
    assert not net.training
    _assert_same_weights(net, original)


def test_loaded_net_runs_like_the_original(tiny_ckpt: Path, tiny_net: RPNet) -> None:
    net, _ = load_checkpoint(tiny_ckpt)
    torch.manual_seed(1)
    moving, fixed = torch.rand(2, 1, 1, *TINY_SIZE)
    with torch.inference_mode():
        got = net(moving, fixed)
        want = tiny_net(moving, fixed)
    assert got.shape == (1, 3, *TINY_SIZE)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_released_checkpoint() -> None:
    if not RELEASED.is_file():
        pytest.skip(f"released checkpoint not available at {RELEASED}")
    net, info = load_checkpoint(RELEASED)
    assert info.format == "released"
    assert info.n_parameters == RELEASED_N_PARAMETERS
    assert sum(p.numel() for p in net.parameters()) == RELEASED_N_PARAMETERS
    assert info.n_resblocks == RELEASED_N_RESBLOCKS
    assert net.n_resblocks == RELEASED_N_RESBLOCKS
    assert info.size == (160, 192, 160)
    assert info.first_channel == 8
    assert not net.training


# --------------------------------------------------------------------------- refused files


def test_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=r"not found.*nope\.pt"):
        load_checkpoint(missing)


def test_checkpoint_error_is_an_iirp_error() -> None:
    assert issubclass(CheckpointError, IirpError)


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"garbage\.pt.*cannot be read"):
        load_checkpoint(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt"):
        load_checkpoint(path)


class _Marker:
    """An arbitrary object: must never be unpickled from a checkpoint."""

    def __init__(self, value: int = 3) -> None:
        self.value = value


class _SneakyDict(collections.OrderedDict):
    """An OrderedDict subclass: looks like a state dict, but is not an allowed type."""


class _Payload:
    """Unpickling this would create a folder (code execution)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (self.target,))


def test_arbitrary_object_is_refused(tmp_path: Path, tiny_net: RPNet) -> None:
    path = tmp_path / "object.pt"
    payload = _released_payload(tiny_net)
    payload["extra"] = _Marker()
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"object\.pt.*weights-only"):
        load_checkpoint(path)


def test_ordereddict_subclass_is_refused(tmp_path: Path, tiny_net: RPNet) -> None:
    path = tmp_path / "subclass.pt"
    torch.save(_SneakyDict(tiny_net.state_dict()), path)
    with pytest.raises(CheckpointError, match=r"subclass\.pt.*weights-only"):
        load_checkpoint(path)


def test_code_in_pickle_is_not_executed(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "x": _Payload(str(target))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights-only"):
        load_checkpoint(path)
    assert not target.exists()


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError, match=r"list\.pt holds a list, not a state dict"):
        load_checkpoint(path)


def test_model_state_not_tensors(tmp_path: Path) -> None:
    path = tmp_path / "bad_state.pt"
    torch.save({"config": {}, "model_state": {"a": 1}}, path)
    with pytest.raises(CheckpointError, match=r"bad_state\.pt.*'model_state' is not a dict of tensors"):
        load_checkpoint(path)


def test_malformed_config_size(tmp_path: Path, tiny_net: RPNet) -> None:
    path = tmp_path / "bad_size.pt"
    torch.save(_released_payload(tiny_net, size=(30, 32, 32)), path)
    with pytest.raises(CheckpointError, match=r"bad_size\.pt.*model size must be 3 multiples of 8"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- strict matching


def test_missing_key(tmp_path: Path, tiny_net: RPNet) -> None:
    state = dict(tiny_net.state_dict())
    del state["decoder2.Conv1.main.bias"]
    path = tmp_path / "missing.pt"
    torch.save({"config": {"size": TINY_SIZE}, "model_state": state}, path)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*missing keys decoder2\.Conv1\.main\.bias"):
        load_checkpoint(path)


def test_unexpected_key(tmp_path: Path, tiny_net: RPNet) -> None:
    state = dict(tiny_net.state_dict())
    state["decoder9.Conv1.main.weight"] = torch.zeros(1)
    path = tmp_path / "unexpected.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys decoder9\.Conv1\.main\.weight"):
        load_checkpoint(path, size=TINY_SIZE)


def test_many_missing_keys_are_summarised(tmp_path: Path, tiny_net: RPNet) -> None:
    state = {k: v for k, v in tiny_net.state_dict().items() if not k.startswith("encoder.")}
    path = tmp_path / "no_encoder.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys encoder\.block1\.main\.weight, .*\(\+\d+ more\)") as info:
        load_checkpoint(path, size=TINY_SIZE)
    assert "\n" not in str(info.value)


def test_wrong_shape(tmp_path: Path, tiny_net: RPNet) -> None:
    state = dict(tiny_net.state_dict())
    state["decoder1.Conv1.main.bias"] = torch.zeros(5)
    path = tmp_path / "shape.pt"
    torch.save(_released_payload(tiny_net) | {"model_state": state}, path)
    with pytest.raises(
        CheckpointError, match=r"shape\.pt.*shape mismatch decoder1\.Conv1\.main\.bias \(5,\) != \(16,\)"
    ):
        load_checkpoint(path)


def test_other_first_channel_is_a_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "fc4.pt"
    torch.save(RPNet(first_channel=4, size=TINY_SIZE).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch encoder\.block1\.main\.weight"):
        load_checkpoint(path, size=TINY_SIZE)


def test_load_state_dict_names_source() -> None:
    state = dict(RPNet(size=TINY_SIZE).state_dict())
    del state["encoder.block4.main.weight"]
    with pytest.raises(CheckpointError, match=r"^my weights does not match RP-Net.*encoder\.block4\.main\.weight"):
        load_state_dict(state, size=TINY_SIZE, source="my weights")


def test_model_grid_record_is_read_and_checked(tiny_net: RPNet, tmp_path: Path) -> None:
    """iirp-train's checkpoints record their grid under "iirp", outside the authors' "config"."""
    payload = _released_payload(tiny_net)
    payload["iirp"] = {"spacing": [2.5, 2.5, 2.5], "orientation": "RAS", "intensity": "percentile:0.5,99.5"}
    path = tmp_path / "recorded.pt"
    torch.save(payload, path)
    _, info = load_checkpoint(path)
    assert (info.spacing, info.orientation, info.intensity) == ((2.5, 2.5, 2.5), "RAS", "percentile:0.5,99.5")
    assert set(payload["config"]) == {"size", "in_channel", "first_channel"}  # RPNet(**config) still works

    _, plain = load_checkpoint(_write(tmp_path / "plain.pt", _released_payload(tiny_net)))
    assert (plain.spacing, plain.orientation, plain.intensity) == (None, None, None)

    for bad, match in [({"spacing": [0, 1, 1]}, "spacing must be 3 positive numbers"),
                       ({"spacing": "2.5"}, "spacing must be 3 positive numbers"),
                       ({"orientation": "XYZ"}, "orientation must be a code like 'RAS'"),
                       ({"intensity": "bogus"}, "recorded intensity rule"),
                       ("not a dict", "'iirp' is not a dict")]:
        payload["iirp"] = bad
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(_write(tmp_path / "bad.pt", payload))


def _write(path: Path, payload: dict) -> Path:
    torch.save(payload, path)
    return path
