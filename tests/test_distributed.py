"""torch.distributed: DDP, FSDP2 and tensor-parallel training equal one process; saved
adapters are whole, equal one process's and load in PEFT; bad input fails clearly.

Each job is 2 CPU ranks over gloo (tests/distributed_worker.py, 1 thread each),
spawned once per module and time-bounded; the ranks meet through a file store in
tmp_path, so runs side by side share no ports.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_ext
from conftest import make_tiny_model_dir

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.slow

WORLD = 2
JOB_TIMEOUT = 300  # seconds for one 2-rank job; a hang fails the test with the ranks' output
WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parents[1]
TOL = 1e-5


def _load_worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _run_ranks(cmds: list[list[str]], cwd: Path, timeout: float = JOB_TIMEOUT) -> list[str]:
    """Start every command, wait for all within ``timeout``; fail with their output otherwise."""
    procs = [
        subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in cmds
    ]
    outputs, timed_out = [], False
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                q.kill()
            outputs.append(p.communicate()[0])
    report = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{o[-4000:]}" for i, (p, o) in enumerate(zip(procs, outputs)))
    if timed_out:
        pytest.fail(f"distributed job did not finish within {timeout} s:\n{report}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"distributed job failed:\n{report}")
    return outputs


def _job(name: str, out: Path) -> dict:
    init = out / f"{name}.store"
    init.unlink(missing_ok=True)  # a file store must start empty
    _run_ranks(
        [[sys.executable, str(WORKER), name, str(r), str(WORLD), str(init), str(out)] for r in range(WORLD)], out
    )
    return torch.load(out / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def ref(out_dir):
    torch.set_num_threads(1)  # as the ranks; restored below
    threads = torch.get_num_threads()
    try:
        return W.reference(out_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddp(out_dir):
    return _job("ddp", out_dir)


@pytest.fixture(scope="module")
def fsdp(out_dir):
    return _job("fsdp", out_dir)


@pytest.fixture(scope="module")
def tp(out_dir):
    return _job("tp", out_dir)


def _close(a, b, what: str) -> None:
    if isinstance(a, list):
        a, b = torch.tensor(a), torch.tensor(b)
    err = (a - b).abs().max().item()
    assert err <= TOL, f"{what}: max difference {err:.3g} > {TOL}"


def _same_adapter(got: Path, want: Path) -> None:
    assert (got / "adapter_config.json").read_text() == (want / "adapter_config.json").read_text()
    g, w = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert g.keys() == w.keys()
    for k in w:
        assert g[k].shape == w[k].shape, k
        _close(g[k], w[k], f"{got.name}: {k}")


CASES = [(k, m) for k in ("mlp", "llama") for m in ("single", "mixed")]
IDS = [f"{k}-{m}" for k, m in CASES]


@pytest.mark.parametrize("kind,mode", CASES, ids=IDS)
def test_ddp_training_equals_one_process(ddp, ref, out_dir, kind, mode):
    got, want = ddp[f"{kind}-{mode}"], ref[f"{kind}-{mode}"]
    _close(got["losses"], want["losses"], "losses")
    for label, out in want["eval"].items():
        _close(got["eval"][label], out, f"{label} output after training")
    for name in ("a", "b") if mode == "mixed" else ("a",):
        _same_adapter(out_dir / f"ddp-{kind}-{mode}-{name}", out_dir / f"ref-{kind}-{mode}-{name}")
    # Only LoRA gradients travel (measured in the comm hook), the frozen base has none.
    assert got["comm_bytes_per_step"] == got["lora_grad_bytes"] < got["model_bytes"]
    assert got["frozen_with_grad"] == []


@pytest.mark.parametrize("kind,mode", CASES, ids=IDS)
def test_fsdp2_training_equals_one_process(fsdp, ref, out_dir, kind, mode):
    got, want = fsdp[f"{kind}-{mode}"], ref[f"{kind}-{mode}"]
    _close(got["losses"], want["losses"], "losses")
    # No-grad forwards under FSDP2 read the gathered parameters, not stale slot stacks.
    for label, out in want["eval"].items():
        _close(got["eval"][label], out, f"{label} no-grad output after training")
    for name in ("a", "b") if mode == "mixed" else ("a",):
        _same_adapter(out_dir / f"fsdp-{kind}-{mode}-{name}", out_dir / f"ref-{kind}-{mode}-{name}")
    assert got["frozen_not_sharded"] == []
    assert got["frozen_with_grad"] == [] and got["frozen_in_optimizer"] == []
    assert got["lora_in_optimizer"] == got["lora_count"]
    if kind == "mlp" and mode == "single":  # load_adapter, then fully_shard: serves the same
        _close(got["loaded_then_sharded"], want["eval"]["uniform"], "adapter loaded before fully_shard")


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_tensor_parallel_equals_one_process(tp, ref, out_dir, kind):
    got, want = tp[f"tp-{kind}"], ref[f"tp-{kind}"]
    _close(got["before"], want["before"], "mixed-batch output")
    _close(got["losses"], want["losses"], "training loss")
    _close(got["after"], want["after"], "mixed-batch output after one step")
    for name in ("a", "b"):
        _same_adapter(out_dir / f"tp-{kind}-{name}", out_dir / f"ref-tp-{kind}-{name}")
    # The rank holds its shard only, in its parameters and its slot stacks alike.
    assert got["local_b_rows"] == got["stack_rows"] == 32 // WORLD


def test_tensor_parallel_over_adapters_loaded_from_files(tp):
    """Frozen adapters (load_adapter) shard, serve a mixed batch, and train once unfrozen."""
    got = tp["tp-loaded"]
    assert got["before_max_diff"] <= TOL and got["after_max_diff"] <= TOL, got
    assert got["trained_moved"] > 1e-3, got  # the training step changed the outputs


def test_tensor_parallel_plain_linear_and_bad_input(tp):
    assert tp["plain_linear_max_diff"] <= TOL
    e = tp["errors"]
    assert e["colwise_odd"].startswith("ValueError") and "out_features=5" in e["colwise_odd"]
    assert e["rowwise_odd"].startswith("ValueError") and "in_features=7" in e["rowwise_odd"]
    assert e["load_after_sharding"].startswith("ValueError") and "sharded" in e["load_after_sharding"]
    assert e["inject_after_sharding"].startswith("ValueError") and "sharded" in e["inject_after_sharding"]
    assert e["layouts"].startswith("ValueError") and "default layouts" in e["layouts"]
    assert e["save_on_one_rank"].startswith("RuntimeError") and "every rank" in e["save_on_one_rank"]
    assert e["save_on_one_rank_seconds"] < 30


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_saved_adapters_load_in_peft(ddp, fsdp, ref, out_dir, tmp_path, kind):
    """The adapters the ranks wrote load in PEFT and reproduce the trained model."""
    if kind == "llama":
        from transformers import AutoModelForCausalLM

        W.tiny_llama_base().save_pretrained(tmp_path / "base")
        base = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()  # noqa: E731
    else:
        base = lambda: W.mlp_base().eval()  # noqa: E731
    x = W.data(kind)[0]
    for job in ("ddp", "fsdp"):
        model = peft.PeftModel.from_pretrained(base(), str(out_dir / f"{job}-{kind}-single-a")).eval()
        out = W.output_of(kind, model, x)
        _close(out, ref[f"{kind}-single"]["eval"]["uniform"], f"PEFT with the {job} adapter")


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_cli_train_under_torchrun(tmp_path):
    """`lora-ext train` on 2 ranks: rank 0 reports and saves one PEFT-format adapter."""
    folder = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "adapter"
    cmd = _torchrun() + [
        "--standalone", f"--nproc-per-node={WORLD}", "-m", "lora_ext.apps.cli", "train", "--task", "upper",
        "--model", str(folder), "--out", str(out), "--steps", "2", "--batch-size", "4", "--rank", "2",
        "--targets", "q_proj,v_proj", "--dtype", "fp32", "--eval", "0",
    ]
    (log,) = _run_ranks([cmd], tmp_path)
    assert log.count("trained 2 steps") == 1, log  # rank 0 alone reports
    assert "2 processes" in log, log
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    from lora_ext.apps import llm

    model, _ = llm.load_model(folder)
    lora_ext.load_adapter(model, str(out), "upper")
    assert lora_ext.list_adapters(model) == ["upper"]


def test_import_lora_ext_leaves_the_parallel_integration_out():
    code = ("import sys, lora_ext; print('lora_ext.parallel' in sys.modules or 'lora_ext.integrations.distributed' "
            "in sys.modules, 'torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.split()[0] == "False", out.stdout
