import json
import os

import pytest
import torch
from safetensors.torch import save_file

from patch_diffusion import checkpoint as ck
from patch_diffusion.errors import UserError


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint-00000001.safetensors"
    tensors = {"a.w": torch.randn(3, 4), "b": torch.arange(5)}
    ck.save_checkpoint(path, tensors, {"step": 1, "config": {"x": [1, 2]}})
    loaded, meta = ck.load_checkpoint(path)
    assert meta == {"step": 1, "config": {"x": [1, 2]}}
    assert set(loaded) == {"a.w", "b"}
    assert torch.equal(loaded["a.w"], tensors["a.w"]) and torch.equal(loaded["b"], tensors["b"])
    assert ck.load_checkpoint(path, with_tensors=False) == ({}, meta)  # header only


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    ck.save_checkpoint(good, {"w": torch.randn(64, 64)}, {"step": 1})
    data = good.read_bytes()
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        ck.load_checkpoint(torn)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04 this is a pickle, not ours")
    with pytest.raises(UserError, match="truncated or not a safetensors"):
        ck.load_checkpoint(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="not a patch-diffusion checkpoint"):
        ck.load_checkpoint(other)
    with pytest.raises(UserError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "missing.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    ck.save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left


def test_optimizer_state_round_trip():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    tensors, info = ck.optimizer_to_tensors(opt)
    opt2 = torch.optim.Adam(net.parameters(), lr=5.0)
    ck.optimizer_from_tensors(opt2, tensors, info)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])


def test_listing_and_pruning(tmp_path):
    for step in (5, 40, 300, 12):
        ck.save_checkpoint(tmp_path / ck.checkpoint_name(step), {"w": torch.zeros(1)}, {})
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        ck.checkpoint_name(s) for s in (5, 12, 40, 300)]
    ck.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.checkpoint_name(s) for s in (40, 300)]


def _raw_safetensors(path, header: dict, body: bytes = b"", length: int | None = None) -> None:
    """A file laid out as safetensors: 8-byte header length, JSON header, tensor bytes."""
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + body)


def _ours(meta: str) -> dict:
    return {"__metadata__": {"format": ck.FORMAT, "version": "1", "meta": meta},
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}


@pytest.mark.parametrize("case", ["huge length", "length past the end", "meta not JSON", "meta a list",
                                  "meta nested too deep", "offsets past the end", "config hostile"])
def test_hostile_headers_are_clean_errors(case, tmp_path):
    path = tmp_path / "checkpoint-00000001.safetensors"
    if case == "huge length":
        _raw_safetensors(path, _ours("{}"), b"\0" * 4, length=1 << 62)
    elif case == "length past the end":
        _raw_safetensors(path, _ours("{}"), b"\0" * 4, length=ck.MAX_HEADER_BYTES)
    elif case == "meta not JSON":
        _raw_safetensors(path, _ours("{'step': __import__('os')}"), b"\0" * 4)
    elif case == "meta a list":
        _raw_safetensors(path, _ours("[1, 2]"), b"\0" * 4)
    elif case == "meta nested too deep":
        _raw_safetensors(path, _ours("[" * 100_000 + "]" * 100_000), b"\0" * 4)
    elif case == "offsets past the end":
        header = _ours("{}")
        header["w"]["data_offsets"] = [0, 1 << 40]
        _raw_safetensors(path, header, b"\0" * 4)
    else:  # a well-formed file whose run config names things that do not exist
        config = {"model": {"backbone": "os.system", "backbone_config": {"cmd": "rm -rf /"}}}
        _raw_safetensors(path, _ours(json.dumps({"config": config, "step": 1})), b"\0" * 4)
    if case == "config hostile":
        from patch_diffusion.train import checkpoint_config
        with pytest.raises(UserError) as err:
            checkpoint_config(path)
    else:
        with pytest.raises(UserError) as err:
            ck.load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_damaged_tensor_fails_its_checksum(tmp_path):
    path = tmp_path / "checkpoint-00000001.safetensors"
    ck.save_checkpoint(path, {"w": torch.arange(256, dtype=torch.float32)}, {"step": 1})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert ck.load_checkpoint(path, with_tensors=False)[1] == {"step": 1}  # the header alone is fine
    with pytest.raises(UserError, match="is corrupt"):
        ck.load_checkpoint(path)
    good, bad = ck.newest_good_checkpoint(tmp_path)
    assert good is None and bad[0][0] == path


def test_atomic_writes_flush_the_folder_entry(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    ck.atomic_write_bytes(tmp_path / "config.json", b"{}")
    assert synced == [False, True]  # the file, then its folder


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".checkpoint-00000003.safetensors.abc.tmp").write_bytes(b"half")
    ck.save_checkpoint(tmp_path / "checkpoint-00000002.safetensors", {"w": torch.zeros(1)}, {})
    assert [p.name for p in ck.remove_stale_temp_files(tmp_path)] == [".checkpoint-00000003.safetensors.abc.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000002.safetensors"]
