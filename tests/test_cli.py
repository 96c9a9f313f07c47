"""The ``unweight`` command: every subcommand explains itself, ``inspect`` tells what a folder holds, bad
input gives exit code 2 and one line naming the file (and tensor) with no traceback, and ``convert``
never half-writes or silently replaces an output."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from unweight import cli
from unweight.eval import evaluate, token_windows

from conftest import make_tiny_gguf

SUBCOMMANDS = [name for name in cli.COMMANDS if importlib.util.find_spec(f"unweight.commands.{name}")]  # built so far
SMOLLM2_PARAMETERS = 134_515_008


def _snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(err: str) -> str:
    """The message unweight printed: the last line of stderr (a progress bar may precede it)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in err
    return lines[-1]


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert {"inspect", "convert", "eval", "fetch", "demo"} <= set(SUBCOMMANDS)
    assert all(name in out for name in SUBCOMMANDS)
    assert cli.main([]) == 1  # no command: the help, and a non-zero exit
    assert "usage: unweight" in capsys.readouterr().out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_help_explains_it(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"usage: unweight {name}")
    summary = (cli._load(name).__doc__ or "").strip().splitlines()
    assert summary and summary[0] in out  # the module docstring is the description


# ------------------------------------------------------------------------------------------- inspect


@pytest.mark.slow
def test_inspect_prints_the_parameter_count(smollm2_bf16, capsys):
    assert cli.main(["inspect", str(smollm2_bf16)]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {SMOLLM2_PARAMETERS:,}" in out and "parameters: 134,515,008" in out
    assert "format: hf" in out and "BF16 x272" in out and "LlamaForCausalLM" in out
    assert cli.main(["inspect", str(smollm2_bf16), "--json", "--tensors"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"] == SMOLLM2_PARAMETERS and d["dtypes"] == {"BF16": 272}
    assert sum(torch.Size(t["shape"]).numel() for t in d["tensor_list"]) == SMOLLM2_PARAMETERS


def test_inspect_missing_path_is_one_line_and_exit_2():
    run = subprocess.run([sys.executable, "-m", "unweight", "inspect", "/nonexistent"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "unweight inspect: error: /nonexistent: no such file or folder\n"


def test_unknown_model_name_lists_the_choices(capsys):
    assert cli.main(["inspect", "smollm3-1b"]) == 2
    assert "smollm2-135m, gemma3-270m, minilm-l6" in _error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- convert


def test_convert_to_an_existing_folder_needs_force_and_leaves_it_untouched(smollm2_bf16, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    assert cli.main(["convert", str(smollm2_bf16), str(out), "--dtype", "fp16"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(out) in line and "already exists" in line and "--force" in line
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_convert_with_force_replaces_the_folder(tmp_path, capsys):
    src = tmp_path / "src.safetensors"
    tensors = {"w": torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), "i": torch.arange(5)}
    save_file(tensors, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert cli.main(["convert", str(src), str(out), "--dtype", "bf16", "--force"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    got = load_file(out / "model.safetensors")
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], tensors["w"].to(torch.bfloat16))
    assert torch.equal(got["i"], tensors["i"])  # integers are not cast
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.safetensors"]


def test_convert_of_an_unsupported_gguf_tensor_fails_cleanly(unsupported_gguf, tmp_path, capsys):
    path, types = unsupported_gguf
    out = tmp_path / "out"
    assert cli.main(["convert", str(path), str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("unweight convert: error: ") and str(path) in line
    assert any(repr(name) in line for name in types)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_convert_of_a_gguf_without_tokenizer_fails_cleanly(tmp_path, capsys):
    path = make_tiny_gguf(tmp_path / "no-tokenizer.gguf", tokenizer=False)
    out = tmp_path / "out"
    assert cli.main(["convert", str(path), str(out)]) == 2
    assert "no-tokenizer.gguf" in _error_line(capsys.readouterr().err)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- eval


@pytest.mark.slow
def test_eval_json_equals_the_api_on_the_same_windows(smollm2_bf16, smollm2_bf16_model, eval_docs, capsys):
    args = ["eval", str(smollm2_bf16), "--seq-len", "128", "--max-tokens", "256", "--json"]
    assert cli.main(args) == 0
    d = json.loads(capsys.readouterr().out)
    model, tok = smollm2_bf16_model
    r = evaluate(model, token_windows(tok, eval_docs, 128, 256), tok, progress=False)
    assert (d["corpus"], d["split"], d["tokens"], d["windows"], d["seq_len"]) == ("austen", "eval", 254, 2, 128)
    for field in ("perplexity", "nll", "bits_per_byte"):
        assert d[field] == getattr(r, field), field  # a separate load, the same numbers
