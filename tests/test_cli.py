"""The ``lora-ext`` command, its tasks and its LLM helpers.

Fast tests use a tiny random Llama model with a byte-level tokenizer written to a
temporary folder (``--model DIR``); the slow test runs ``lora-ext demo`` on the real
SmolLM2-135M-Instruct with the shipped adapters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model_dir
from lora_ext.apps import cli, llm
from lora_ext.apps.tasks import BASE_QUESTIONS, TASKS, WORDS, check_base, get_task

# ------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_generator_is_deterministic_and_self_consistent(name):
    task = get_task(name)
    first = task.examples(50, seed=3)
    assert first == task.examples(50, seed=3)
    assert first != task.examples(50, seed=4)
    for prompt, answer in first:
        assert prompt and answer
        assert task.answer(prompt) == answer
        assert task.check(prompt, answer)
        assert task.check(prompt, f"  {answer}\n")  # whitespace is not an error
        assert not task.check(prompt, answer + " x")
        assert not task.check(prompt, "")


def test_upper_and_reverse_answers():
    assert TASKS["upper"].answer("green apple river") == "GREEN APPLE RIVER"
    assert TASKS["reverse"].answer("green apple river") == "river apple green"
    assert not TASKS["upper"].check("green apple", "Green Apple")
    assert not TASKS["reverse"].check("green apple river", "green apple river")


def test_arith_answers():
    arith = TASKS["arith"]
    assert arith.answer("47 + 8") == "55"
    assert arith.answer("12 - 9") == "3"
    assert arith.check("47 + 8", "55")
    assert not arith.check("47 + 8", "47 + 8 = 55")
    for prompt, answer in arith.examples(200, seed=0):
        a, op, b = prompt.split()
        assert int(answer) == eval(f"{int(a)} {op} {int(b)}")  # noqa: S307 (digits only)


def test_words_and_base_questions():
    assert len(WORDS) == len(set(WORDS)) >= 100
    assert all(w.isalpha() and w.islower() for w in WORDS)
    question, expected = BASE_QUESTIONS[0]
    assert check_base(question, f"The answer is {expected}.")
    assert not check_base(question, "I do not know.")


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_demo_rows_use_several_adapters_and_the_base_model():
    rows = cli.demo_rows()
    adapters = [a for _, a in rows]
    assert None in adapters
    assert set(a for a in adapters if a) == set(TASKS)
    assert rows[0][0] == rows[1][0] and rows[0][1] != rows[1][1]
    assert rows == cli.demo_rows()  # the same batch every run


# ------------------------------------------------------------- tiny model helpers


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llm"))


def test_load_model_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        llm.load_model(tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_EXT_CACHE", str(tmp_path / "c"))
    assert llm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORA_EXT_CACHE")
    assert llm.cache_dir() == llm.Path.home() / ".cache" / "lora_ext"


def test_training_labels_cover_exactly_the_answer(tiny_model_dir):
    _, tokenizer = llm.load_model(tiny_model_dir)
    pairs = [("cat dog", "CAT DOG"), ("a much longer prompt here", "x")]
    batch = llm.encode_for_training(tokenizer, pairs)
    for row, (prompt, answer) in enumerate(pairs):
        labels = batch["labels"][row]
        answer_ids = labels[labels != -100].tolist()
        assert tokenizer.decode(answer_ids) == answer + tokenizer.eos_token
        n = int(batch["attention_mask"][row].sum())
        prompt_ids = batch["input_ids"][row, : n - len(answer_ids)].tolist()
        assert tokenizer.decode(prompt_ids) == llm.format_prompt(tokenizer, prompt)
        assert batch["attention_mask"][row, n:].sum() == 0  # right padded


def test_answer_loss_matches_the_full_model_loss(tiny_model_dir):
    model, tokenizer = llm.load_model(tiny_model_dir)
    batch = llm.encode_for_training(tokenizer, [("ab", "cd"), ("hello there", "x")])
    expected = model(**batch).loss
    torch.testing.assert_close(llm.answer_loss(model, batch), expected)


def test_batched_generation_equals_one_row_at_a_time(tiny_model_dir):
    model, tokenizer = llm.load_model(tiny_model_dir)
    prompts = ["a", "a longer prompt", "mid size"]
    batched = llm.generate(model, tokenizer, prompts, max_new_tokens=5)
    assert batched.steps <= 5
    for i, prompt in enumerate(prompts):
        single = llm.generate(model, tokenizer, [prompt], max_new_tokens=5)
        assert single.texts[0] == batched.texts[i]


def test_train_eval_and_demo_run_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    """The commands end to end (a random model fails the checks: demo exits 1)."""
    model_args = ["--model", str(tiny_model_dir), "--threads", "1"]
    for name in TASKS:
        out = tmp_path / "adapters" / name
        rc = cli.main(["train", "--task", name, "--out", str(out), "--steps", "3",
                       "--batch-size", "2", "--eval", "2", "--dtype", "fp32", *model_args])
        assert rc == 0
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8
        from safetensors import safe_open

        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    text = capsys.readouterr().out
    assert "trained 3 steps" in text and "check pass rate" in text

    assert cli.main(["eval", "--task", "arith", "-n", "2", *model_args]) == 0
    rc = cli.main(["demo", "--adapters", str(tmp_path / "adapters"), "--repeats", "1", *model_args])
    text = capsys.readouterr().out
    assert rc == 1
    assert text.count("check:") == len(cli.demo_rows())
    assert "lora_ext mixed batch" in text and "base model alone" in text
    assert "PEFT, same batch" in text


def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    """Run ``lora-ext argv``: exit status 2, the error in one line, last; no traceback.

    (Progress bars of a model load that happened first may precede it.)
    """
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:] and err.endswith("\n"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def test_demo_without_adapters_says_how_to_train(tmp_path, capsys):
    _one_line_error(capsys, ["demo", "--adapters", str(tmp_path)], "lora-ext train --task")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--task", "nope", "--out", "x"], ["invalid choice: 'nope'", "--help"]),
        (["train", "--task", "upper", "--out", "x", "--steps", "0"], ["--steps", "positive integer"]),
        (["eval", "--task", "upper", "-n", "many"], ["-n", "many"]),
        (["demo", "--threads", "-2"], ["--threads"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        ([], ["required"]),
    ],
    ids=["unknown-task", "zero-steps", "non-integer", "negative-threads", "unknown-command", "no-command"],
)
def test_bad_command_lines_are_one_line_errors(capsys, argv, expected):
    _one_line_error(capsys, argv, *expected)


def test_missing_model_folder_is_a_one_line_error(tmp_path, capsys):
    _one_line_error(capsys, ["eval", "--task", "upper", "--model", str(tmp_path / "none")],
                    "--model", "no such folder")
    _one_line_error(capsys, ["eval", "--task", "upper", "--model", str(tmp_path)], "config.json")


def test_unloadable_model_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    _one_line_error(capsys, ["eval", "--task", "upper", "--model", str(tmp_path)],
                    f"--model {tmp_path}: cannot load it")


def test_missing_or_corrupt_adapter_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    model_args = ["--model", str(tiny_model_dir), "--threads", "1"]
    _one_line_error(capsys, ["eval", "--task", "upper", "-n", "1", "--adapter", str(tmp_path / "none"),
                             *model_args], "adapter folder not found")
    (tmp_path / "adapter_config.json").write_text("{not json")
    _one_line_error(capsys, ["eval", "--task", "upper", "-n", "1", "--adapter", str(tmp_path), *model_args],
                    f"cannot load the adapter in {tmp_path}")


def test_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _one_line_error(capsys, ["train", "--task", "upper", "--out", str(tmp_path / "file")], "not a folder")


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The console script, as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "lora-ext")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "lora_ext.apps.cli"]
    proc = subprocess.run(command + ["eval", "--task", "upper", "--adapter", str(tmp_path / "none")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"lora-ext eval: error: adapter folder not found: {tmp_path / 'none'}"]


def test_the_core_never_imports_the_applications():
    code = "import sys, lora_ext; print(sorted(m for m in sys.modules if m.startswith('lora_ext.apps')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def test_old_module_path_still_runs_the_command_with_a_warning(tmp_path):
    """The deprecated shim lora_ext/cli.py, run with -m: the same command, plus a FutureWarning."""
    proc = subprocess.run([sys.executable, "-m", "lora_ext." + "cli", "eval", "--task", "upper", "--adapter",
                           str(tmp_path / "none")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "FutureWarning" in proc.stderr and "lora_ext.apps.cli" in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"lora-ext eval: error: adapter folder not found: {tmp_path / 'none'}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_adapters_are_small_bf16_peft_files(name):
    folder = cli.SHIPPED_ADAPTERS / name
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < 4 * 2**20
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


# ------------------------------------------------------------------- real model


@pytest.mark.slow
def test_demo_on_the_real_model_passes_every_check(tmp_path):
    """``lora-ext demo`` as a user runs it: from an unrelated directory."""
    pytest.importorskip("gguf")
    script = os.path.join(os.path.dirname(sys.executable), "lora-ext")  # the console script
    if os.path.exists(script):
        command = [script, "demo", "--repeats", "1"]
    else:
        command = [sys.executable, "-m", "lora_ext.apps.cli", "demo", "--repeats", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = len(cli.demo_rows())
    assert proc.stdout.count("check:  PASS") == rows
    assert f"all {rows} checks passed" in proc.stdout
    for label in ("lora_ext mixed batch", "PEFT, same batch", "base model alone"):
        assert label in proc.stdout
