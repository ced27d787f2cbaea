"""Every command refuses bad input in one line with exit code 2, and leaves nothing half-written:
`python -m pytest tests/test_cli_errors.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scimoe.convert.cli import export_main, import_main
from scimoe.data.preprocess import main as preprocess_main
from scimoe.launch.slurm import main as launch_main
from scimoe.plan.cli import main as plan_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused(main, argv, capsys) -> str:
    """What `main(argv)` printed to stderr; it must have exited 2 in one line, without a traceback."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]  # progress bars aside
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("content, name", [(None, "ls"), (b"", "empty"), (b"\x7fELF\x00\x01\x02", "bin.jsonl"),
                                           (b"", "empty.jsonl"), (b"\x00\x00", "zeros.txt")])
def test_preprocess_refuses_binary_and_empty_inputs_by_name(tmp_path, capsys, content, name):
    path = "/bin/ls" if content is None else str(tmp_path / name)
    if content is not None:
        (tmp_path / name).write_bytes(content)
    err = _refused(preprocess_main, [path, "--out", str(tmp_path / "out")], capsys)
    assert path in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


def test_preprocess_skips_and_counts_lines_that_are_not_utf8(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "\xff\xfe"}\n{"text": "another"}\n')
    preprocess_main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "made" / "here" / "corpus")])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["skipped"] == 1
    assert f"{tmp_path / 'a.jsonl'}:2: not UTF-8 text" in captured.err
    assert (tmp_path / "made" / "here" / "corpus.bin").exists()  # the --out folder was created


def test_multimodal_preprocess_of_an_empty_file_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    _refused(preprocess_main, [str(tmp_path / "empty.jsonl"), "--multimodal", "--out", str(tmp_path / "shards")],
             capsys)
    assert not (tmp_path / "shards").exists()


def test_a_tokenizer_too_large_for_the_vocab_size_flag_names_the_flag(tmp_path, capsys):
    from scimoe.data.tokenizer import train_bpe

    train_bpe(["some words to learn a few merges from"] * 20, 300).save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("hello there\n")
    err = _refused(preprocess_main, [str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--tokenizer",
                                     str(tmp_path / "tok.json"), "--vocab-size", "100"], capsys)
    assert "but --vocab-size is 100" in err and "model.vocab_size" not in err


@pytest.mark.parametrize("config", ["[1, 2]", "null", "\"text\""])
def test_import_refuses_a_config_that_is_not_an_object(tmp_path, capsys, config):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(config)
    err = _refused(import_main, [str(tmp_path / "hf"), str(tmp_path / "run")], capsys)
    assert "config.json: not a usable config (a JSON" in err and "not an object" in err
    assert not (tmp_path / "run").exists()


def test_export_of_a_folder_that_is_not_a_checkpoint_says_so(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    err = _refused(export_main, [str(tmp_path / "notes"), str(tmp_path / "out")], capsys)
    assert "is not a scimoe checkpoint" in err and "resume" not in err and not (tmp_path / "out").exists()


def test_planner_blames_the_global_batch_when_it_is_the_problem(capsys):
    with pytest.raises(SystemExit) as stop:
        plan_main(["cluster.gpus=7"])
    out = capsys.readouterr().out
    assert stop.value.code == 1
    assert "the first to change is train.global_batch" in out and "more GPUs" not in out


def test_submit_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    err = _refused(launch_main, ["slurm", "--submit", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert "sbatch, which is not on PATH" in err


@pytest.mark.parametrize("module", ["scimoe.plan.cli", "scimoe.convert.cli", "scimoe.data.preprocess",
                                    "scimoe.launch.slurm", "scimoe.report"])
def test_every_cli_module_runs_or_refuses_under_python_m(module):
    out = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
    assert out.returncode != 0 or out.stdout.strip(), (module, out.returncode, out.stdout, out.stderr)
    assert out.stdout.strip() or "usage" in out.stderr, (module, out.stderr[-2000:])


@pytest.mark.parametrize("override, key", [("data.path=/no/such.txt", "data.path"),
                                           ("checkpoint.init_weights=/no/such/folder", "checkpoint.init_weights")])
def test_a_missing_file_or_folder_is_one_line_and_exit_2(tmp_path, override, key):
    out = subprocess.run([sys.executable, "-m", "scimoe.train", override, "data=text", "data.tokenizer=",
                          "train.steps=1", f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count(f"config error at '{key}'") == 1, out.stderr[-3000:]
