"""What a person sees: progress on a terminal and in logs, one-line errors, --version, doctor."""

from __future__ import annotations

import io
import logging

import pytest

from mura_ray import cli, console, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_a_plain_line_every_few_seconds(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_SECONDS", 0.0)
    out = io.StringIO()
    with progress.Progress("scoring", 100, stream=out) as bar:
        for _ in range(4):
            bar.update(20, postfix="0 errors")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert "scoring 80/100 images" in lines[-1] and "images/s" in lines[-1] and "left" in lines[-1]


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place():
    term = _Terminal()
    with progress.Progress("decoding", 50, stream=term) as bar:
        bar.update(25)
        progress.write_line("a line above the bar", term)
        bar.update(25)
    drawn = term.getvalue()
    assert "\r" in drawn and "decoding" in drawn and "25/50" in drawn and "a line above the bar\n" in drawn


def test_ray_loggers_go_to_the_log_file_not_the_console(tmp_path, capsys):
    console.setup()
    console.set_ray_log(str(tmp_path / "ray.log"))
    console.before_ray_init()  # what cluster.connect does before ray.init
    logging.getLogger("ray.data").warning("an execution plan nobody asked for")
    logging.getLogger("mura_ray.train").info("epoch 1/1 done")
    out = capsys.readouterr()
    assert "epoch 1/1 done" in out.out and "execution plan" not in out.out + out.err
    assert "execution plan" in (tmp_path / "ray.log").read_text()


def test_version_names_the_packages(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("mura-ray ") and "ray 2.60.0" in out and "torch " in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--data", "a", "--out", "b", "--placement-strategy", "ANY"], "invalid choice"),
        (["score", "--model", "m", "--data", "a", "--out", "o", "--split", "validation"], "invalid choice"),
        (["score", "--model", "m", "--data", "a", "--out", "o", "--run-id", "../x"], "--run-id"),
        (["train", "--data", "a", "--out", "b", "--image-size", "4096"], "between 32 and 1024"),
        (["train", "--data", "a", "--out", "b", "--seed", "-1"], "must be >= 0"),
        (["evaluate", "--model", "m", "--data", "a"], "required: --out"),
        (["demo", "--workers", "0"], "must be >= 1"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(capsys, args, needle):
    with pytest.raises(SystemExit) as done:
        cli.main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and err.startswith("mura-ray: error:")


@pytest.mark.parametrize("verb", ["sample", "train", "evaluate", "score", "demo", "doctor", "bench"])
def test_help_of_each_verb_shows_an_example(capsys, verb):
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    out = capsys.readouterr().out
    assert "example:\n  mura-ray " + verb in out


def test_the_same_flags_mean_the_same_things_in_every_verb():
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in verbs.items()}
    for verb in ("train", "evaluate", "score"):
        assert "--data" in flags[verb] and "--out" in flags[verb]
    for verb in ("evaluate", "score"):
        assert "--model" in flags[verb]
    assert "--out" in flags["sample"] and "--out" in flags["demo"]
    assert not any({"--input", "--output"} & f for f in flags.values())


def test_doctor_reports_versions_cpu_and_the_local_cluster(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["doctor", "--check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for needle in (
        "mura-ray",
        "torchvision",
        "pydicom",
        "cpu features",
        "avx2",
        "amx_bf16",
        "local: a command starts its own Ray",
        "all usable",
    ):
        assert needle in out
    assert cli.main(["doctor", "--check", str(tmp_path / "missing")]) == 1
    assert "problem: " in capsys.readouterr().out


def test_doctor_checks_s3_access_without_printing_secrets(s3_server, s3_bucket, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-printed")  # moto takes any secret
    assert cli.main(["doctor", "--check", f"s3://{s3_bucket}"]) == 0
    out = capsys.readouterr().out
    assert f"s3://{s3_bucket}: listable" in out and "credentials from env" in out
    assert "s3cr3t-never-printed" not in out
    assert cli.main(["doctor", "--check", "s3://no-such-bucket-here/x"]) == 1
    assert "problem: s3://no-such-bucket-here/x" in capsys.readouterr().out
