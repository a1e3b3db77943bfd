"""No path, patient id or UID from the archive in pseudonymized scoring output, overlay captions or model folders."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from mura_ray import cli
from mura_ray.model.checkpoint import model_metadata, save_checkpoint, state_dict_bytes
from mura_ray.model.resnet import build_model
from tests.dicom_files import dicom_bytes, gradient
from tests.readers import connect, scores

# File names as PACS exports write them: the patient id, the study instance UID, the image.
PHI_FILES = [
    "PAT12345/1.2.840.113619.2.55.3/IMG0001.dcm",
    "PAT12345/1.2.840.113619.2.55.3/IMG0002.dcm",
    "PAT12345/1.2.840.113619.2.55.3/IMG0003.dcm",  # unreadable: an error row, whose message names no path
    "PAT67890/1.2.840.113619.2.55.9/IMG0001.png",
    "PAT67890/1.2.840.113619.2.55.7/CT0001.dcm",  # a CT: counted as not scored
    "XR_HAND/patient55555/study1_negative/1.2.840.113619.2.55.12.png",  # a patient id the catalog reads
]
PHI_PARTS = sorted({part for f in PHI_FILES for part in f.split("/")} | {"PAT12345", "PAT67890", "113619", "55555"})
KEY = b"0123456789abcdef0123456789abcdef0123456789abcdef"


def _leaks(text: str) -> list[str]:
    return [p for p in PHI_PARTS if p in text]


def _text_of(path) -> str:
    """A file's bytes as text, and a Parquet file's rows and metadata too (its pages may be compressed)."""
    text = open(path, "rb").read().decode("latin-1")
    if str(path).endswith(".parquet"):
        table = pq.read_table(path)
        text += json.dumps(table.to_pylist(), default=str) + str(table.schema.metadata)
    return text


def _write_archive(root):
    for rel in PHI_FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("IMG0003.dcm"):
            path.write_bytes(dicom_bytes(gradient(), corrupt=True))
        elif rel.endswith(".png"):
            Image.fromarray((gradient() >> 4).astype(np.uint8)).save(path)
        else:
            path.write_bytes(dicom_bytes(gradient(), modality="CT" if "CT" in rel else "CR"))


@pytest.mark.parametrize(
    "content, needle",
    [(None, "does not exist"), (b"", "is empty"), (b"\n", "is empty"), (b"short-key\n", "holds 9 bytes")],
)
@pytest.mark.parametrize("by", ["flag", "environment"])
def test_a_missing_empty_or_short_key_file_exits_2_with_one_line(capsys, tmp_path, monkeypatch, content, needle, by):
    key = tmp_path / "key"
    if content is not None:
        key.write_bytes(content)
    args = ["score", "--model", str(tmp_path / "model"), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    if by == "flag":
        args += ["--pseudonymize", str(key)]
    else:
        monkeypatch.setenv("MURA_RAY_PSEUDONYM_KEY_FILE", str(key))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "key file" in err and needle in err, err
    assert not os.path.exists(tmp_path / "o")


def test_the_overlay_caption_names_no_path(monkeypatch):
    """The caption drawn into an overlay's pixels is its score and the batch's caption, never the image path."""
    from mura_ray.imaging.preprocess import EvalPreset
    from mura_ray.scoring.heatmaps import HeatmapMaker

    drawn = []
    real_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(
        ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: (drawn.append(text), real_text(self, xy, text))
    )
    torch.manual_seed(0)
    maker = HeatmapMaker.__new__(HeatmapMaker)  # the actor's state, without Ray's object store
    maker.model, maker.meta, maker.layer = build_model().eval(), model_metadata(48), "layer3"
    maker.crop = EvalPreset(size=48)
    side = int(maker.meta["cache_side"])
    rng = np.random.default_rng(0)
    uris = np.array([f"/archive/{f}" for f in PHI_FILES[:2]], dtype=object)
    batch = {
        "image_uri": uris,
        "error": np.array(["", ""], dtype=object),
        "pixels": rng.integers(0, 255, (2, side, side), dtype=np.uint8),
        "shown": rng.integers(0, 255, (2, 300, 300), dtype=np.uint8),
        "prob_abnormal": np.array([0.9, 0.8], np.float32),
    }
    out = maker(batch)
    assert all(len(p) for p in out["png"]) and len(drawn) == 2
    assert not [leak for text in drawn for leak in _leaks(text)], drawn
    drawn.clear()
    maker(dict(batch, caption=np.array(["S1a2b/I3c4d", "S1a2b/I5e6f"], dtype=object)))
    assert drawn == ["P(abnormal) 0.900  S1a2b/I3c4d", "P(abnormal) 0.800  S1a2b/I5e6f"]


def _files_under(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]


@pytest.mark.timeout(600)
def test_pseudonymized_scoring_names_nothing_of_the_paths_and_a_second_night_scores_nothing(
    ray_cluster, tmp_path, capsys
):
    root, out = tmp_path / "archive", tmp_path / "scores"
    _write_archive(root)
    torch.manual_seed(0)
    # Threshold 0: every study is flagged, so every scored image gets a heatmap.
    save_checkpoint(str(tmp_path / "model"), build_model().eval(), dict(model_metadata(48), threshold=0.0))
    key, mapping = tmp_path / "key", tmp_path / "private" / "map.csv"
    key.write_bytes(KEY + b"\n")
    args = ["score", "--model", str(tmp_path / "model"), "--data", str(root), "--out", str(out)]
    args += ["--heatmaps", "flagged", "--modalities", "CR,DX", "--pseudonymize", str(key)]
    capsys.readouterr()
    assert cli.main([*args, "--pseudonym-map", str(mapping)]) == 3  # 1 of 5 failed: over --max-error-rate
    console = capsys.readouterr()
    print(console.out, console.err)
    assert not _leaks(console.out + console.err), console

    kinds = {kind: scores(str(out), kind) for kind in ("image", "study", "heatmap", "not_scored", "run")}
    images, studies = kinds["image"], kinds["study"]
    assert images.num_rows == 5 and images["error"].null_count == 4
    assert studies.num_rows == 3 and kinds["heatmap"].num_rows == 4 and kinds["not_scored"].num_rows == 1
    assert kinds["run"].num_rows == 1
    for kind, table in kinds.items():
        for name in table.column_names:
            text = json.dumps(table[name].to_pylist(), default=str)
            assert not _leaks(text), (kind, name, _leaks(text))
    # A study's images share its pseudonym, and the study rows the images' patient.
    study_of = {r["image_uri"]: r["study_uri"] for r in images.to_pylist()}
    assert all(image.startswith(study + "/") for image, study in study_of.items())
    assert sorted(set(study_of.values())) == sorted(studies["study_uri"].to_pylist())
    patients = {p for p in images["patient_id"].to_pylist() if p is not None}
    assert len(patients) == 1 and patients == {p for p in studies["patient_id"].to_pylist() if p is not None}
    error = images.filter(pc.is_valid(images["error"]))["error"][0].as_py()
    assert "decode" in error
    files = _files_under(out)
    assert sum(f.endswith(".heatmap.png") for f in files) == 4
    # The files scanned below include the table's: its Parquet under scores/kind=*/, and its log, whose JSON
    # holds each file's partition values and min/max statistics of every column (image_uri's among them).
    data = [f for f in files if os.path.relpath(f, out).startswith("scores/kind=") and f.endswith(".parquet")]
    assert {os.path.relpath(f, out).split("/")[1] for f in data} >= {f"kind={k}" for k in kinds}
    log = [f for f in files if os.path.relpath(f, out).startswith("scores/_delta_log/") and f.endswith(".json")]
    adds = [a for f in log for line in open(f) if line.strip() for a in [json.loads(line).get("add")] if a]
    assert adds and any("image_uri" in json.loads(a.get("stats") or "{}").get("minValues", {}) for a in adds)
    for path in files:
        assert not _leaks(os.path.relpath(path, out)), path
        assert not _leaks(_text_of(path)), path
    # The map, where it was asked for, gives each pseudonym's path back.
    rows = pcsv.read_csv(mapping).to_pylist()
    back = {r["pseudonym"]: r["original"] for r in rows if r["kind"] in ("image", "patient")}
    scored = [f for f in PHI_FILES if "CT" not in f]
    assert {back[u] for u in images["image_uri"].to_pylist()} == {str(root / f) for f in scored}
    assert {back[p] for p in patients} == {"patient55555"}

    # The next night, with the same key, finds everything scored already.
    assert cli.main(args) == 0
    console = capsys.readouterr()
    assert not _leaks(console.out + console.err) and "scored 0, skipped 5" in console.out, console.out
    assert connect(str(out)).execute("SELECT count(*) FROM images").fetchone() == (5,)
    # Another key (or none) is refused for this output: its rows would not match the earlier ones.
    other = tmp_path / "other-key"
    other.write_bytes(KEY[::-1])
    assert cli.main([*args[:-1], str(other)]) == 2
    assert cli.main(args[:-2]) == 2
    assert "holds rows pseudonymized with key" in capsys.readouterr().err


def _predictions(split, n, seed):
    """Predictions as training keeps them, of images named as a PACS export names them."""
    rng = np.random.default_rng(seed)
    patients = [f"PAT{10000 + k // 4}" for k in range(n)]
    studies = [f"/archive/{split}/{p}/1.2.840.113619.2.55.{k // 2}" for k, p in enumerate(patients)]
    labels = rng.integers(0, 2, n).astype(np.int8)
    return pa.table(
        {
            "image_uri": [f"{s}/IMG{k:04d}.dcm" for k, s in enumerate(studies)],
            "label": pa.array(labels),
            "prob_abnormal": pa.array(np.clip(labels * 0.5 + rng.random(n) * 0.5, 0, 1).astype(np.float32)),
            "study_uri": studies,
            "body_part": ["WRIST"] * n,
            "patient_id": patients,
        }
    )


def _write_model(run_dir, seed, **asked):
    from mura_ray.training import protocol, rundir

    torch.manual_seed(seed)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "tune_patients.txt"), "w") as f:
        f.write("PAT10000\nPAT10001\n")
    metadata = dict(model_metadata(48), protocol=protocol.record(0.1, ["PAT10000", "PAT10001"], 40, 40))
    tune, valid = _predictions("train", 40, 0), _predictions("valid", 40, 1)
    return rundir.write_model_folder(
        run_dir,
        state_dict_bytes(build_model()),
        tune,
        valid,
        metadata,
        target_sensitivity=None,
        seed=0,
        **asked,
    )


def test_model_folders_and_mlflow_artifacts_name_no_image_or_patient_unless_asked(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow.artifacts

    from mura_ray.config import EnsembleConfig
    from mura_ray.training.ensemble import build_ensemble
    from mura_ray.training.tracking import Tracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    for keep in (False, True):
        run_dir = str(tmp_path / f"run-{keep}")
        asked = {"keep_predictions": True} if keep else {}  # the default is what the first round checks
        meta = _write_model(run_dir, seed=0, **asked)
        logged = Tracker(store, run_dir).finish(meta, [{"epoch": 1, "train_loss": 0.5}], None, **asked)
        local = mlflow.artifacts.download_artifacts(
            run_id=logged["run_id"], tracking_uri=store, dst_path=str(tmp_path / f"artifacts-{keep}")
        )
        model_dir = os.path.join(run_dir, "model")
        for where in (model_dir, local):
            found = {p: _leaks(_text_of(p)) for p in _files_under(where)}
            assert any(p.endswith("valid_predictions.parquet") for p in found)
            leaking = {os.path.basename(p) for p, leaks in found.items() if leaks}
            if where == local:  # the tuning split's patients are logged only when asked for
                assert ("tune_patients.txt" in {os.path.basename(p) for p in found}) == keep
            if keep:  # asked for: the paths and ids in the predictions
                assert {"valid_predictions.parquet", "tune_predictions.parquet"} <= leaking
            else:
                assert not leaking, found
        # The run directory keeps its own predictions whole.
        assert (
            pq.read_table(os.path.join(run_dir, "valid_predictions.parquet"))["image_uri"][0]
            .as_py()
            .startswith("/archive/valid/PAT")
        )

    # An ensemble of keyed members is built from their keys, and names nobody either.
    second = str(tmp_path / "second")
    _write_model(second, seed=1)
    result = build_ensemble(EnsembleConfig(models=[str(tmp_path / "run-False"), second], out=str(tmp_path / "ens")))
    one = json.load(open(os.path.join(tmp_path / "run-False", "model", "metadata.json")))
    assert result["validation"]["study"]["n"] == one["validation"]["study"]["n"] == 20
    for path in _files_under(result["model_dir"]):
        assert not _leaks(open(path, "rb").read().decode("latin-1")), path
