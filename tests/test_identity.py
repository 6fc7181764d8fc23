"""A model known by its content: weight files' sha256 from the Hub's blob names or a per-machine hash cache, and
what resume compares."""

import hashlib
import os

import pytest

from svd_batch import identity
from svd_batch.fingerprint import fingerprint_diff
from svd_batch.identity import changed_weights, file_sha256s, model_facts


def fake_hub_file(cache, repo: str, filename: str, data: bytes, rev: str = "0" * 40):
    """A file as huggingface_hub lays it out in HF_HUB_CACHE: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    sha = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / sha).write_bytes(data)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    link = root / "snapshots" / rev / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(root / "blobs" / sha, link.parent))
    return link, sha


@pytest.fixture()
def reads(monkeypatch):
    """Every file whose bytes are read to hash it."""
    seen = []
    real = identity.stream_sha256

    def counting(path):
        seen.append(path)
        return real(path)
    monkeypatch.setattr(identity, "stream_sha256", counting)
    return seen


def checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "StableVideoDiffusionPipeline"}')
    (root / "unet" / "config.json").write_text('{"in_channels": 8}')
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x01" * 4096)
    (root / "vae").mkdir()
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x02" * 1024)
    return root


def test_a_second_identity_reads_no_weight_bytes(tmp_path, reads):
    root = checkpoint(tmp_path)
    cache = str(tmp_path / "hashes.json")
    first = model_facts(str(root), cache_file=cache)
    assert len(reads) == 2  # the two weight files, once; configs are not "weights"
    assert first["model.weights.unet/diffusion_pytorch_model.safetensors"] == hashlib.sha256(b"\x01" * 4096).hexdigest()
    reads.clear()
    assert model_facts(str(root), cache_file=cache) == first
    assert reads == []


def test_a_file_rewritten_in_place_with_the_same_size_is_hashed_again(tmp_path, reads):
    root = checkpoint(tmp_path)
    cache = str(tmp_path / "hashes.json")
    unet = root / "unet" / "diffusion_pytorch_model.safetensors"
    before = model_facts(str(root), cache_file=cache)
    st = os.stat(unet)
    with open(unet, "r+b") as f:  # in place: same inode, same size
        f.write(b"\x03")
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old mtime put back (cp -p, rsync -t)
    reads.clear()
    after = model_facts(str(root), cache_file=cache)
    assert reads == [os.path.realpath(unet)]
    assert after["model.identity"] == before["model.identity"]  # names, configs and sizes cannot tell
    assert changed_weights(before, after) == ["unet/diffusion_pytorch_model.safetensors"]  # same model.path (none)
    key = "model.weights.unet/diffusion_pytorch_model.safetensors"
    assert fingerprint_diff(before, after) == [f"{key}: {before[key]!r} -> {after[key]!r}"]


def test_files_in_the_hugging_face_cache_are_known_by_their_blob_name_unread(tmp_path, reads):
    link, sha = fake_hub_file(tmp_path / "hub", "org/model", "unet/diffusion_pytorch_model.safetensors", b"w" * 100)
    assert file_sha256s([str(link)], str(tmp_path / "hashes.json")) == {str(link): sha}
    assert reads == []
    assert not (tmp_path / "hashes.json").exists()  # nothing to remember


def test_an_unwritable_hash_cache_only_costs_a_second_read(tmp_path, reads):
    root = checkpoint(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cache = str(blocker / "hashes.json")
    assert model_facts(str(root), cache_file=cache) == model_facts(str(root), cache_file=cache)
    assert len(reads) == 4


def test_the_unet_weights_file_has_its_own_entry(tmp_path):
    root = checkpoint(tmp_path)
    extra = tmp_path / "lcm.safetensors"
    extra.write_bytes(b"lcm")
    facts = model_facts(str(root), str(extra), cache_file=str(tmp_path / "h.json"))
    assert facts["model.unet_weights.sha256"] == hashlib.sha256(b"lcm").hexdigest()
    before = {**facts, "model.path": str(root), "model.unet_weights": str(extra)}
    changed = {**before, "model.unet_weights.sha256": "0" * 64}
    assert changed_weights(before, changed) == ["model.unet_weights"]
    # Another file named (or another checkpoint): a change of settings, said as such, not "replaced in place".
    assert changed_weights(before, {**changed, "model.unet_weights": "other.safetensors"}) == []
    moved = {**before, "model.path": "elsewhere", "model.weights.unet/diffusion_pytorch_model.safetensors": "1" * 64}
    assert changed_weights(before, moved) == []


def test_folders_made_before_weights_were_hashed_still_resume():
    old = {"model.path": "p", "model.identity": "abc", "generation.seed": 42}
    now = {**old, "model.weights.unet/x.safetensors": "f" * 64, "model.unet_weights": None}
    assert fingerprint_diff(old, now) == []


def test_unet_weights_added_to_a_folder_made_before_the_key_existed_is_a_change():
    old = {"model.path": "p", "model.identity": "abc"}
    now = {**old, "model.unet_weights": "org/repo/lcm.safetensors", "model.unet_weights.sha256": "f" * 64}
    assert fingerprint_diff(old, now) == ["model.unet_weights: None -> 'org/repo/lcm.safetensors'"]
