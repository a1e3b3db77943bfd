"""The command line as a user meets it: help, bad input (exit 2, one line), the sample verb.

Most cases call ``cli.main`` in this process (what the ``mura-ray`` entry
point runs); a few run the real command in a subprocess, interpreter exit
included.
"""

import os
import subprocess
import sys

import pytest

from mura_ray.cli import main

CLI = [sys.executable, "-m", "mura_ray.cli"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, **kw)


def run_main(capsys, *args):
    """(exit code, stdout, stderr) of ``mura-ray ARGS`` run through ``cli.main``."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "verb",
    ["sample", "train", "evaluate", "score", "explain", "monitor", "bench", "demo", "bench nightly", "bench guard"],
)
def test_help_explains_each_verb(capsys, verb):
    code, out, _ = run_main(capsys, *verb.split(), "--help")
    assert code == 0
    assert "usage: mura-ray " + verb in out and len(out.splitlines()) > 5


def test_sample_verb_writes_an_archive(tmp_path):
    r = run("sample", "--out", str(tmp_path), "--studies", "4", "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert "MURA-v1.1" in r.stdout
    assert os.path.exists(tmp_path / "MURA-v1.1" / "train_image_paths.csv")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/run", "--weights", "none"], "archive root not found"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--weights", "none"], "no images"),
        (["score", "--model", "{tmp}/nomodel", "--data", "{tmp}", "--out", "{tmp}/o"], "not a mura-ray checkpoint"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--trainable", "layer9"], "--trainable"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--weights", "{tmp}/w.pt"], "weights"),
        (["score", "--model", "ftp://x/y", "--data", "{tmp}", "--out", "{tmp}/o"], "unsupported storage scheme"),
        (["sample", "--out", "{tmp}/s", "--studies", "2"], "at least 4"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--epochs", "0"], "must be >= 1"),
        (
            ["score", "--model", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o", "--max-error-rate", "1.5"],
            "between 0 and 1",
        ),
        (["evaluate", "--model", "{tmp}/nomodel", "--data", "{tmp}", "--out", "{tmp}/e"], "not a mura-ray checkpoint"),
        (
            ["score", "--model", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o", "--backend", "onnxruntime"]
            + ["--precision", "bf16"],
            "fp32 only",
        ),
        (
            ["score", "--model", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o", "--backend", "tensorrt"],
            "invalid choice",
        ),
        (["bench", "nightly", "--sizes", "10,-3"], "positive whole numbers"),
        (["explain", "--model", "{tmp}/nomodel", "--data", "{tmp}", "--out", "{tmp}/x"], "not a mura-ray checkpoint"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--tune-fraction", "1.5"], "between 0 and 1"),
        (["score", "--model", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o", "--heatmaps", "all"], "invalid choice"),
        (["evaluate", "--model", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/e", "--tta", "rotate"], "invalid choice"),
        (["monitor", "--scores", "{tmp}/nothing"], "no committed scoring runs"),
        (["monitor", "--scores", "{tmp}", "--psi-alert", "-1"], "--psi-alert"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--register", "m"], "--register needs MLflow tracking"),
        (["score", "--model", "models:/m/1", "--data", "{tmp}", "--out", "{tmp}/o"], "MLFLOW_TRACKING_URI"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, args, needle):
    (tmp_path / "w.pt").write_bytes(b"\x80\x04not safetensors")
    (tmp_path / "train_image_paths.csv").write_text("")
    code, out, err = run_main(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert needle in err
    assert (
        err.strip().splitlines()[-1].startswith(("mura-ray: error:", "mura-ray ")) and "error:" in err.splitlines()[-1]
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["train", "--data", "{tmp}/missing", "--out", "{tmp}/run", "--weights", "none"],
            "mura-ray: error: archive root not found",
        ),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--trainable", "layer9"], "--trainable"),
        (
            ["score", "--model", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o", "--max-error-rate", "1.5"],
            "between 0 and 1",
        ),
    ],
)
def test_the_real_command_exits_2_with_one_line(tmp_path, args, needle):
    (tmp_path / "train_image_paths.csv").write_text("")
    r = run(*[a.format(tmp=tmp_path) for a in args], env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]
