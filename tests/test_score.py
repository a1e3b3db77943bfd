"""Scoring on a real local Ray cluster, the scores table read back with DuckDB."""

import json
import os
import shutil

import pytest
import torch

from mura_ray.config import ScoreConfig
from mura_ray.model import backends
from mura_ray.scoring.run import run_scoring
from tests.readers import connect

IMAGE_TYPES = {
    "image_uri": "VARCHAR",
    "study_uri": "VARCHAR",
    "patient_id": "VARCHAR",
    "body_part": "VARCHAR",
    "label": "TINYINT",
    "prob_abnormal": "FLOAT",
    "predicted_abnormal": "BOOLEAN",
    "threshold": "FLOAT",
    "model_id": "VARCHAR",
    "scoring_id": "VARCHAR",
    "run_id": "VARCHAR",
    "scored_at": "TIMESTAMP WITH TIME ZONE",
    "source_size": "BIGINT",
    "source_etag": "VARCHAR",
    "error": "VARCHAR",
    "backend": "VARCHAR",
    "precision": "VARCHAR",
}
STUDY_TYPES = {
    "study_uri": "VARCHAR",
    "patient_id": "VARCHAR",
    "body_part": "VARCHAR",
    "n_images": "INTEGER",
    "n_errors": "INTEGER",
    "prob_abnormal": "FLOAT",
    "predicted_abnormal": "BOOLEAN",
    "label": "TINYINT",
    "model_id": "VARCHAR",
    "scoring_id": "VARCHAR",
    "run_id": "VARCHAR",
    "scored_at": "TIMESTAMP WITH TIME ZONE",
}


@pytest.mark.timeout(600)
def test_scores_every_file_and_study_with_contract_types(trained_run, small_archive, tmp_path):
    _, trained = trained_run
    root, plan = small_archive
    archive = tmp_path / "archive"
    shutil.copytree(os.path.join(root, "MURA-v1.1", "valid"), archive / "MURA-v1.1" / "valid")
    bad_study = archive / "MURA-v1.1" / "valid" / "XR_HAND" / "patient99999" / "study1_positive"
    bad_study.mkdir(parents=True)
    (bad_study / "image1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # corrupt PNG
    shutil.copy(os.path.join(root, next(i.rel_path for i in plan if i.split == "valid")), bad_study / "image2.png")
    out = str(tmp_path / "scores")

    manifest = run_scoring(ScoreConfig(model=trained["model_dir"], data=str(archive), out=out))

    n_files = sum(i.split == "valid" for i in plan) + 2
    n_studies = len({i.study_rel for i in plan if i.split == "valid"}) + 1
    con = connect(out)
    images, studies = "images", "studies"
    assert dict((r[0], r[1]) for r in con.execute(f"DESCRIBE SELECT * FROM {images}").fetchall()) == IMAGE_TYPES
    assert dict((r[0], r[1]) for r in con.execute(f"DESCRIBE SELECT * FROM {studies}").fetchall()) == STUDY_TYPES
    assert con.execute(f"SELECT count(*), count(DISTINCT image_uri) FROM {images}").fetchone() == (n_files, n_files)
    assert con.execute(f"SELECT count(*) FROM {studies}").fetchone()[0] == n_studies
    assert manifest["images"] == n_files and manifest["errors"] == 1
    threshold = json.load(open(os.path.join(trained["model_dir"], "metadata.json")))["threshold"]
    assert manifest["threshold"] == threshold and manifest["chunks"] == 1

    err = con.execute(
        f"SELECT image_uri, prob_abnormal, predicted_abnormal, error FROM {images} WHERE error IS NOT NULL"
    ).fetchall()
    assert len(err) == 1 and err[0][0].endswith("patient99999/study1_positive/image1.png")
    assert err[0][1] is None and err[0][2] is None and "decode" in err[0][3]
    # Each score names the engine that computed it: the one --backend auto picked on this machine.
    engines = con.execute(
        f"SELECT backend, precision, count(*) FROM {images} WHERE error IS NULL GROUP BY ALL"
    ).fetchall()
    meta = json.load(open(os.path.join(trained["model_dir"], "metadata.json")))
    refused = backends.failed_guard(meta)
    first = next(c for c in backends.candidates("auto", "auto", torch.device("cpu")) if " ".join(c) not in refused)
    assert engines == [(*first, n_files - 1)] and manifest["engines"] == {" ".join(first): n_files - 1}
    assert con.execute(f"SELECT backend, precision FROM {images} WHERE error IS NOT NULL").fetchall() == [(None, None)]
    lo, hi, nulls = con.execute(
        f"SELECT min(prob_abnormal), max(prob_abnormal), count(*) - count(prob_abnormal) FROM {images}"
    ).fetchone()
    assert 0.0 <= lo <= hi <= 1.0 and nulls == 1
    assert con.execute(f"SELECT count(DISTINCT model_id), min(model_id) FROM {images}").fetchone() == (
        1,
        trained["model_id"],
    )
    row = con.execute(
        f"SELECT n_images, n_errors, prob_abnormal FROM {studies} WHERE study_uri LIKE '%patient99999%'"
    ).fetchone()
    one = con.execute(f"SELECT prob_abnormal FROM {images} WHERE image_uri LIKE '%patient99999%image2.png'").fetchone()[
        0
    ]
    assert row[0] == 2 and row[1] == 1 and row[2] == pytest.approx(one)
    # Study means equal the mean of their images' scores.
    diff = con.execute(
        f"SELECT max(abs(s.prob_abnormal - i.p)) FROM {studies} s JOIN "
        f"(SELECT study_uri, avg(prob_abnormal) p FROM {images} GROUP BY study_uri) i USING (study_uri)"
    ).fetchone()[0]
    assert diff < 1e-5
    # One Delta table, nothing else beside it; the run's row says it finished, in its one chunk.
    assert sorted(os.listdir(out)) == ["scores"] and os.path.isdir(os.path.join(out, "scores", "_delta_log"))
    assert con.execute("SELECT run_id, chunks, final FROM runs").fetchall() == [(manifest["run_id"], 1, True)]
