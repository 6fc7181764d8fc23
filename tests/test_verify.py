import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, SAMPLE, run_cli, write_manifest

pytestmark = pytest.mark.slow


def test_verify_regenerates_a_sample_and_catches_a_tampered_hash(tmp_path):
    # Started in the manifest's folder with a relative manifest.path (and a row that fails): verify, run from
    # another directory, reads each row's image where the run resolved it, and refuses to check the failed row.
    rows = [{"id": f"r{i}", "image": str(SAMPLE / "cat.jpg"), "seed": i} for i in range(4)]
    write_manifest(tmp_path / "m.parquet", rows + [{"id": "gone", "image": "missing.jpg"}])
    out = tmp_path / "out"
    assert run_cli("manifest.path=m.parquet", f"output.dir={out}", "report.enabled=false", cwd=tmp_path).returncode == 1
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.verify", str(out), "--sample", "2"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 2 sampled rows match" in proc.stdout and proc.stdout.count("match    r") == 2
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.verify", str(out), "--ids", "gone"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "'gone' did not finish ok" in proc.stderr and "Traceback" not in proc.stderr
    # Tamper with one recorded hash: verify must notice.
    t = pq.read_table(out / "results.parquet")
    hashes = t["frames_sha256"].to_pylist()
    hashes[1] = "0" * 64
    t = t.set_column(t.schema.get_field_index("frames_sha256"), "frames_sha256", pa.array(hashes))
    pq.write_table(t, out / "results.parquet")
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.verify", str(out), "--ids", "r0,r1"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "MISMATCH r1" in proc.stdout and "match    r0" in proc.stdout


def test_verify_a_compiled_batched_run_with_an_attention_backend(tmp_path):
    """verify regenerates with the run's compile, attention and batching: exact matches, batches included."""
    rows = [{"id": f"r{i}", "image": str(SAMPLE / ("cat.jpg" if i % 2 else "rocket.jpg")), "seed": i,
             "motion_bucket_id": 40 * i} for i in range(3)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "report.enabled=false", "runtime.batch_size=2",
                   "runtime.compile=true", "runtime.compile_backend=eager", "runtime.attention=math")
    assert proc.returncode == 0, proc.stderr
    assert sorted(pq.read_table(out / "results.parquet")["batch_size"].to_pylist()) == [1, 2, 2]
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.verify", str(out), "--sample", "3"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 of 3 sampled rows match" in proc.stdout and "(" not in proc.stdout  # no caveat on any row
