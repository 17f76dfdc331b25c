"""The dequantised-weights cache: checksummed on write, verified on load, rebuilt when it lies.

Most tests run the cache logic on a small fake checkpoint (the 20 s dequantisation replaced by a
writer of a few kilobytes); one slow test corrupts a copy of the real smollm2-135m cache.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest

from lensdyn import models

SPEC = models.EMBEDDED_MODELS["smollm2-135m"]
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB, no run of zeros


def _fake_checkpoint(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(WEIGHTS)
    return directory


def _zero_block(path, offset, length):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    models.write_manifest(checkpoint)
    manifest = json.loads((checkpoint / models.CACHE_MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["files"]["model.safetensors"]["size"] == len(WEIGHTS)
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    assert models.manifest_mismatch(checkpoint) is None


@pytest.mark.parametrize("offset", [0, 512 * 1024, len(WEIGHTS) - 4096])
def test_a_block_of_zeros_anywhere_is_caught(tmp_path, offset):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    models.write_manifest(checkpoint)
    _zero_block(checkpoint / "model.safetensors", offset, 4096)
    assert "model.safetensors" in models.manifest_mismatch(checkpoint)


def test_truncated_missing_and_unrecorded_files_are_caught(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    assert "no checksum manifest" in models.manifest_mismatch(checkpoint)
    models.write_manifest(checkpoint)
    with open(checkpoint / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "1000 bytes" in models.manifest_mismatch(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    assert "model.safetensors is missing" in models.manifest_mismatch(checkpoint)
    (checkpoint / models.CACHE_MANIFEST).write_text("{not json")
    assert "unreadable" in models.manifest_mismatch(checkpoint)


def test_an_edit_after_a_successful_verification_is_still_caught(tmp_path):
    """Verification is remembered per process only while the files are the same files, unmodified."""
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    models.write_manifest(checkpoint)
    assert models.manifest_mismatch(checkpoint) is None
    time.sleep(0.05)  # file times tick with the kernel's coarse clock; a real edit comes later than this
    _zero_block(checkpoint / "model.safetensors", 4096, 4096)
    assert "model.safetensors" in models.manifest_mismatch(checkpoint)


@pytest.fixture
def fake_dequantise(monkeypatch, tmp_path):
    """Point the cache at tmp_path and replace the GGUF dequantisation by a fast fake; count its runs."""
    monkeypatch.setenv("LENSDYN_CACHE", str(tmp_path))
    runs = []

    def dequantise_into(spec, gguf_dir, gguf_file, staging):
        runs.append(staging)
        _fake_checkpoint(staging)

    monkeypatch.setattr(models, "_dequantise_into", dequantise_into)
    return runs


def _cache():
    gguf_dir, gguf_file = SPEC.locate(SPEC.package_dir())
    return models._dequantised_cache(SPEC, gguf_dir, gguf_file)


def test_corrupted_cache_is_rebuilt_with_one_warning(fake_dequantise):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first build is silent
        target = _cache()
        assert _cache() == target and len(fake_dequantise) == 1
    time.sleep(0.05)  # as above: the edit must come after the verification it is to defeat
    _zero_block(target / "model.safetensors", 100_000, 50_000)
    with pytest.warns(UserWarning) as caught:
        assert _cache() == target
    assert len(caught) == 1 and len(fake_dequantise) == 2
    message = str(caught[0].message)
    assert "\n" not in message and "rebuilding" in message and "model.safetensors" in message
    assert (target / "model.safetensors").read_bytes() == WEIGHTS
    assert models.manifest_mismatch(target) is None


def test_cache_without_manifest_is_rebuilt(fake_dequantise, tmp_path):
    """A cache from before checksums cannot be vouched for: rebuild it once."""
    target = _cache()
    (target / models.CACHE_MANIFEST).unlink()
    with pytest.warns(UserWarning, match="no checksum manifest"):
        _cache()
    assert len(fake_dequantise) == 2 and (target / models.CACHE_MANIFEST).is_file()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_directories_are_removed_live_ones_kept(fake_dequantise, tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    name = "smollm2-135m-0.1.2-98362432"
    dead = parent / (models._staging_prefix(name, _dead_pid()) + "abcd1234")
    live = parent / (models._staging_prefix(name, os.getpid()) + "efgh5678")
    legacy_old = parent / ".smollm2-135m-0.1.2-98362432-k3j4h5g6"  # before pids were recorded
    legacy_recent = parent / ".smollm2-135m-0.1.2-98362432-z9y8x7w6"
    for staging in (dead, live, legacy_old, legacy_recent):
        _fake_checkpoint(staging)
    two_hours_ago = time.time() - 7200
    os.utime(legacy_old, (two_hours_ago, two_hours_ago))
    _cache()
    assert not dead.exists() and not legacy_old.exists()
    assert live.exists() and legacy_recent.exists()
    assert len(fake_dequantise) == 1 and not fake_dequantise[0].exists()  # its own staging renamed away


def test_staging_name_records_the_pid(fake_dequantise):
    assert models._staging_pid(".smollm2-135m-0.1.2-98362432-k3j4h5g6") is None  # the size is not a pid
    _cache()
    staging = fake_dequantise[0].name
    assert staging.startswith(".smollm2-135m-")
    assert models._staging_pid(staging) == os.getpid()


@pytest.mark.slow
def test_real_cache_with_50_mb_of_zeros_is_rebuilt_to_the_same_weights(monkeypatch, tmp_path):
    """The fault of issue 15 end to end: zeros written into the real cached float32 weights."""
    real = models.embedded_checkpoint("smollm2-135m")
    monkeypatch.setenv("LENSDYN_CACHE", str(tmp_path))
    target = tmp_path / "models" / real.name
    shutil.copytree(real, target)
    assert models.manifest_mismatch(target) is None
    expected = json.loads((target / models.CACHE_MANIFEST).read_text())
    _zero_block(target / "model.safetensors", 200 * 2**20, 50 * 2**20)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert models.embedded_checkpoint("smollm2-135m") == target
    assert json.loads((target / models.CACHE_MANIFEST).read_text())["files"] == expected["files"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]
