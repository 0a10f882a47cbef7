"""`python -m jxent`: the demonstration's numbers meet the bounds, its outputs are well formed,
and README.md quotes what it prints."""

import json
import math
import os
import subprocess
import sys

import pytest
from _quoted import assert_quoted

from jxent import toy
from jxent.__main__ import main


def _run(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess (as a user starts it), with default settings."""
    proc = subprocess.run(
        [sys.executable, "-m", "jxent", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def json_run():
    return _run("--json")


@pytest.mark.slow
def test_readme_quotes_what_the_main_job_prints():
    """README's sample is the table, line by line; only the seconds may differ (_quoted.py)."""
    assert_quoted("python -m jxent", _run("--quiet").stdout)


def _check_figures(figures, steps):
    assert abs(figures["final_loss"] - figures["conditional_entropy"]) <= 1e-3
    assert figures["loss_gap"] == pytest.approx(
        figures["final_loss"] - figures["conditional_entropy"]
    )
    assert 0 <= figures["kl_to_mle"] <= 1e-3
    assert figures["nll_sum"] == pytest.approx(-figures["log_likelihood"], rel=1e-4)
    # the summed and the mean NLL describe the same tokens
    assert figures["nll_sum"] == pytest.approx(figures["final_loss"] * figures["tokens"], rel=1e-5)
    assert figures["steps"] == steps
    assert figures["seconds"] > 0
    for row in figures["probabilities"]:
        assert row["mle"] == pytest.approx(row["count"] / row["context_count"])
        assert row["model"] == pytest.approx(row["mle"], abs=1e-3)


@pytest.mark.slow
def test_json_meets_the_bounds(json_run):
    out = json.loads(json_run.stdout)  # stdout is exactly one JSON object
    for key in ("final_loss", "conditional_entropy", "kl_to_mle", "nll_sum",
                "log_likelihood", "steps", "seconds"):
        assert key in out and key in out["conditional"]
    _check_figures(out, toy.DEFAULT_STEPS)
    _check_figures(out["conditional"], toy.DEFAULT_STEPS)
    assert out["seed"] == 0
    assert out["seconds"] < out["total_seconds"] < 60


@pytest.mark.slow
def test_json_figures_match_an_independent_recount(json_run):
    """The reported entropy is that of the seed-0 corpus, recounted here."""
    out = json.loads(json_run.stdout)
    corpus = toy.sample_corpus(0, num_sentences=out["sentences"])
    contexts, targets = toy.lm_events(corpus)
    assert out["tokens"] == len(contexts)
    counts = {}
    for c, y in zip(contexts.tolist(), targets.tolist(), strict=True):
        counts[c, y] = counts.get((c, y), 0) + 1
    totals = {}
    for (c, _), n in counts.items():
        totals[c] = totals.get(c, 0) + n
    entropy = -sum(n * math.log(n / totals[c]) for (c, _), n in counts.items()) / len(contexts)
    assert out["conditional_entropy"] == pytest.approx(entropy, rel=1e-12)


@pytest.mark.slow
def test_progress_goes_to_stderr(json_run):
    lines = json_run.stderr.strip().splitlines()
    assert any(line.startswith("[language model] step") for line in lines)
    assert any(line.startswith("[translation] step") for line in lines)
    assert "gap to entropy floor" in lines[-1]


@pytest.mark.slow
def test_table_and_plot(tmp_path, capsys):
    path = tmp_path / "loss.png"
    assert main(["--steps", "5", "--sentences", "20", "--seed", "3", "--plot", str(path)]) == 0
    out, err = capsys.readouterr()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("loss vs H(next | prev)", "KL(MLE ‖ model)", "total NLL vs -log-likelihood",
                 "P(cat | the)", "p(y | x)", "P(kitty | chat)", str(path)):
        assert text in out
    assert "[translation] step     5/5" in err


def test_plot_without_matplotlib_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert main(["--plot", str(tmp_path / "x.png")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "--plot needs matplotlib" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args", [["--steps", "0"], ["--sentences", "-1"]])
def test_rejects_non_positive_sizes(args, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(args)
    assert excinfo.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_rejects_a_negative_seed(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--seed", "-1"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--seed must be a non-negative integer, got -1" in err
    assert "Traceback" not in err


def test_plot_into_a_missing_directory_fails_before_training(tmp_path, capsys):
    path = tmp_path / "missing" / "x.png"
    with pytest.raises(SystemExit) as excinfo:
        main(["--plot", str(path)])
    assert excinfo.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"directory {tmp_path / 'missing'} does not exist; nothing was run" in err
    assert "[language model]" not in err  # nothing was trained


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="needs POSIX permissions that bind the user (root writes anywhere)")
def test_plot_into_a_read_only_directory_fails_before_training(tmp_path, capsys):
    directory = tmp_path / "read-only"
    directory.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as excinfo:
        main(["--plot", str(directory / "x.png")])
    assert excinfo.value.code == 2
    assert "is not writable; nothing was run" in capsys.readouterr().err


@pytest.mark.slow
def test_a_reader_that_closes_early_ends_the_run_quietly(tmp_path):
    """``python -m jxent | head``: no BrokenPipeError traceback, the SIGPIPE status."""
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jxent", "--steps", "5", "--sentences", "20", "--quiet"],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        proc.stdout.close()  # the reader is gone before the first line is written
        returncode = proc.wait(timeout=300)
        stderr.seek(0)
        err = stderr.read()
    assert err == ""
    assert returncode == 141


@pytest.mark.slow
def test_the_mle_of_a_context_never_seen_is_undefined(capsys):
    """A one-sentence corpus leaves example contexts unseen: no ``0/0  0.0000`` MLE."""
    argv = ["--sentences", "1", "--steps", "5", "--quiet"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["probabilities"] + out["conditional"]["probabilities"]
    unseen = [row for row in rows if row["context_count"] == 0]
    assert unseen, "the test needs a context the corpus never shows"
    for row in rows:
        if row["context_count"] == 0:
            assert row["mle"] is None
        else:
            assert row["mle"] == pytest.approx(row["count"] / row["context_count"])
        assert 0 < row["model"] < 1  # the model's probability is shown either way

    assert main(argv) == 0
    table = capsys.readouterr().out
    for row in unseen:
        line = next(ln for ln in table.splitlines()
                    if f"P({row['word']} | {row['context']})" in ln)
        assert "0/0" in line and "—" in line and "context never seen" in line
        assert f"{row['model']:.4f}" in line
