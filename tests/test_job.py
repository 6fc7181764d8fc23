"""job.propose: what a launch may join (issue 23). No model and no process: the model's identity is stubbed."""

from __future__ import annotations

import pytest

from tests.conftest import SAMPLE, settings, write_manifest


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    from svd_batch import job

    monkeypatch.setattr(job, "local_model_facts", lambda s: ("/models/tiny", {"model.identity": "tiny@1"}))
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "image": str(SAMPLE / "cat.jpg")}
                                                       for i in range(3)])
    return [f"manifest.path={manifest}", f"output.dir={tmp_path / 'out'}"]


def propose(*overrides: str, alone: bool):
    from svd_batch.job import propose
    from svd_batch.manifest import load_for
    from svd_batch.rundir import RunDir

    s = settings(*overrides)
    rundir = RunDir(s.output.dir)
    rundir.create()
    return propose(s, load_for(s), rundir, "cpu", 1, alone)


@pytest.mark.parametrize("override, said", [
    ("video.crf=30", "video.crf: the job has 18, this launch 30"),
    ("video.preset=fast", "video.preset: the job has 'medium', this launch 'fast'"),
    ("generation.num_inference_steps=5", "generation.num_inference_steps: the job has 4, this launch 5"),
])
def test_a_launch_joining_before_the_first_row_is_refused_with_other_settings(folder, override, said):
    """Between a launch planning the job and its first recorded row (nothing in the folder but the plan), a second
    launch with other settings must not join: it would make its share of the videos its own way."""
    from svd_batch.rundir import RunDir, RunDirError

    first = propose(*folder, alone=True)
    assert not first.joined
    with pytest.raises(RunDirError) as refused:
        propose(*folder, override, alone=False)
    assert said in str(refused.value) and "other manifest rows" not in str(refused.value)
    assert not RunDir(folder[1].split("=", 1)[1]).has_previous_work()  # the window: no row recorded yet
    joined = propose(*folder, alone=False)  # the same settings still join
    assert joined.joined and joined.job.job == first.job.job
