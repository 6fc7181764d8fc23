"""Issue 20: the output folder is svd-batch's own. A folder it did not make is refused before any write; in its own
folder, cleanup and overwrite=true delete only what it recorded or is writing, and nothing goes through a link."""

import hashlib
import os
import shutil

import pytest

from svd_batch import ownership
from svd_batch.atomic import atomic_path
from tests.conftest import SAMPLE, read_results, write_manifest
from tests.test_hostile_inputs import RUN_PEAK, run_measured


def snapshot(root) -> dict[str, tuple]:
    """Every file and link under root: content hash (or link target) and mtime."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, name)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def plant(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def manifest(tmp_path):
    return write_manifest(tmp_path / "m.parquet", [{"id": "r0", "image": str(SAMPLE / "cat.jpg")},
                                                   {"id": "r1", "image": str(SAMPLE / "rocket.jpg")}])


# Names svd-batch writes itself, planted where it would write them: a folder holding them is still not its own.
LOOKALIKES = {
    "config.yaml": b"mine: true\n", "index.html": b"<html>my page</html>", "contact_sheet.png": b"not a png",
    "results.parquet": b"my data", "stats/rank-00000.json": b"{}", "report/data-00007.js": b"var mine;",
    "notes.tmp-keep": b"keep me", "backup.tmp-2024.tar": b"tarball", "index-old.html": b"old page",
    "videos/clip.tmp-1.mp4": b"clip", "videos/holiday.mp4": b"holiday", "inputs/photo.jpg": b"photo",
}


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_svd_batch_did_not_make_is_refused_untouched(tmp_path, overwrite):
    etc = tmp_path / "etc-copy"
    plant(etc, {"passwd": b"root:x:0:0:root:/root:/bin/bash\n", "hosts": b"127.0.0.1 localhost\n",
                "ssh/sshd_config": b"PermitRootLogin no\n", **LOOKALIKES})
    before = snapshot(etc)
    proc, peak = run_measured(f"manifest.path={manifest(tmp_path)}", f"output.dir={etc}", f"overwrite={overwrite}")
    assert proc.returncode == 2, proc.stderr
    assert "already holds files that svd-batch did not make" in proc.stderr and str(etc) in proc.stderr
    assert "Traceback" not in proc.stderr and peak < RUN_PEAK
    assert snapshot(etc) == before  # nothing written, nothing deleted, nothing overwritten


@pytest.mark.slow
def test_its_own_folder_loses_only_what_it_recorded_or_was_writing(tmp_path):
    m, out = manifest(tmp_path), tmp_path / "out"
    proc, _ = run_measured(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert (out / ownership.MARKER).is_file()
    first = {r["id"]: r["finished_at"] for r in read_results(out).to_pylist()}
    # A folder of an older svd-batch has no marker: it is recognised by its state and adopted.
    (out / ownership.MARKER).unlink()
    # In its own folder, the files a run writes are its own (report/data-00007.js is a stale chunk of a longer run);
    # the rest is the user's, even a video of an id it never recorded.
    written = ("config.yaml", "index.html", "contact_sheet.png", "results.parquet", "stats/rank-00000.json",
               "report/data-00007.js")
    user_files = {k: v for k, v in LOOKALIKES.items() if k not in written}
    user_files["report/data-7.js"] = b"not a chunk name"
    plant(out, user_files)
    # What a killed writer leaves: names of svd-batch's own temporaries, which a start sweeps.
    left = ["videos/.r0.mp4.tmp-424242.mp4", "results.parquet.tmp-424242", "inputs/r1.jpg.tmp-424242",
            f".svd-batch/parts/{'1' * 20}-abcdef01-rank00000-00000.parquet.tmp-424242"]
    plant(out, {rel: b"half" for rel in left})
    mine = {rel: v for rel, v in snapshot(out).items() if rel in user_files}
    proc, peak = run_measured(f"manifest.path={m}", f"output.dir={out}", "overwrite=true")
    assert proc.returncode == 0, proc.stderr
    assert peak < RUN_PEAK
    assert {rel: v for rel, v in snapshot(out).items() if rel in user_files} == mine
    assert not [rel for rel in left if (out / rel).exists()]
    again = {r["id"]: r["finished_at"] for r in read_results(out).to_pylist()}
    assert set(again) == {"r0", "r1"} and all(again[k] > first[k] for k in again)  # redone
    assert sorted(p.name for p in (out / "videos").rglob("r*.mp4")) == ["r0.mp4", "r1.mp4"]
    assert (out / ownership.MARKER).is_file()


@pytest.mark.slow
def test_a_symlinked_videos_folder_is_refused_and_its_target_untouched(tmp_path):
    m, out = manifest(tmp_path), tmp_path / "out"
    proc, _ = run_measured(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    elsewhere = tmp_path / "elsewhere"
    plant(elsewhere, {"precious.mp4": b"precious", "a.tmp-1": b"a", "r0.mp4": b"not the run's",
                      ".r1.mp4.tmp-5.mp4": b"looks like a temporary"})
    shutil.rmtree(out / "videos")
    (out / "videos").symlink_to(elsewhere)
    before, folder = snapshot(elsewhere), snapshot(out)
    for extra in (["overwrite=true"], []):
        proc, peak = run_measured(f"manifest.path={m}", f"output.dir={out}", *extra)
        assert proc.returncode == 2, proc.stderr
        assert "videos (a symlink to" in proc.stderr and "never through a link" in proc.stderr
        assert snapshot(elsewhere) == before and snapshot(out) == folder and peak < RUN_PEAK


def test_a_spread_folder_sweeps_and_overwrites_in_its_subfolders_only_what_is_its_own(tmp_path):
    from svd_batch.rundir import RunDir, RunDirError

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    a, b = ownership.subfolder("r0"), ownership.subfolder("r1")
    out = tmp_path / "out"
    plant(out, {f"videos/{a}/r0.mp4": b"v", f"inputs/{a}/r0.jpg": b"i", f".svd-batch/thumbs/{a}/r0.png": b"t",
                f"videos/{b}/.r1.mp4.tmp-424242.mp4": b"half", f"inputs/{b}/r1.jpg.tmp-424242": b"half",
                f"videos/{a}/holiday.mp4": b"mine", f"videos/{b}/clip.tmp-1.mp4": b"mine", "videos/zz/r0.mp4": b"mine"})
    ownership.remove_temporaries(str(out))
    ownership.remove_recorded(str(out), ["r0"])
    left = {rel for rel in snapshot(out) if rel.startswith(("videos/", "inputs/", ".svd-batch/thumbs"))}
    assert left == {f"videos/{a}/holiday.mp4", f"videos/{b}/clip.tmp-1.mp4", "videos/zz/r0.mp4"}
    # A subfolder that is a link out of the folder is refused like a linked videos/.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / "videos" / b)
    (out / "videos" / b).symlink_to(elsewhere)
    with pytest.raises(RunDirError, match=f"videos/{b} \\(a symlink to"):
        RunDir(str(out)).create()


def test_the_temporary_pattern_is_exactly_atomic_paths_names(tmp_path):
    """Every temporary name svd-batch's writers make matches; names a person might give their files do not."""
    ours = {"": ["results.parquet", "config.yaml", "index.html", "contact_sheet.png"],
            "videos": ["a.b=1,c@d.mp4"], "inputs": ["r0.jpg"], "report": ["data-00003.js"],
            "stats": ["rank-00001.json"], ".svd-batch": ["run.json", "records.parquet"],
            ".svd-batch/parts": [f"{'2' * 20}-0123abcd-rank00001-00002.parquet"],
            ".svd-batch/done": [f"{'2' * 20}-0123abcd-rank00001.json"], ".svd-batch/thumbs": ["r0.png"]}
    for folder, names in ours.items():
        for name in names:
            for hidden, keep in ((False, False), (True, True)) if folder == "videos" else ((False, False),):
                with pytest.raises(RuntimeError), atomic_path(str(tmp_path / name), hidden, keep) as tmp:
                    made = os.path.basename(tmp)
                    raise RuntimeError
                assert ownership.is_temporary(folder, made), (folder, made)
                assert ownership.is_ours(folder, name) and not ownership.is_temporary(folder, name)
    for folder, name in [("", "notes.tmp-keep"), ("", "backup.tmp-2024.tar"), ("", "my.yaml.tmp-1"),
                         ("videos", "clip.tmp-1.mp4"), ("videos", "holiday.mp4.tmp-x"), ("report", "data-7.js.tmp-1"),
                         ("inputs", "photo.png.tmp-1"), ("nowhere", "results.parquet.tmp-1")]:
        assert not ownership.is_temporary(folder, name), (folder, name)
