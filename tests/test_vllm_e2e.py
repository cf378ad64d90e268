"""vLLM end to end with the lora_ext plugin: offline (``vllm.LLM``) and served
(vLLM's OpenAI-compatible server queried by the ``openai`` client), on the default
model with the three shipped adapters. Needs vLLM (scripts/setup_vllm.sh).

Each engine runs in its own process, bounded in time, and is always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM not installed (run scripts/setup_vllm.sh)")

import vllm_e2e  # noqa: E402

HERE = Path(__file__).parent
ENGINE_TIMEOUT_S = 600  # one engine start is 20-60 s on 2 cores; generous for a busy machine


def _offline(tmp_path_factory, plugin_on: bool, bad_adapters: bool) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("vllm_plugin_on" if plugin_on else "vllm_plugin_off")
    bad_dir = folder / "bad"
    if bad_adapters:
        vllm_e2e.make_bad_adapters(bad_dir)
    out = folder / "result.json"
    env = dict(os.environ, LORA_EXT_VLLM="1" if plugin_on else "0")
    cmd = [sys.executable, str(HERE / "vllm_e2e.py"), str(out)] + ([str(bad_dir)] if bad_adapters else [])
    proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text()), log


@pytest.fixture(scope="module")
def offline_with_plugin(tmp_path_factory):
    return _offline(tmp_path_factory, plugin_on=True, bad_adapters=True)


@pytest.fixture(scope="module")
def offline_without_plugin(tmp_path_factory):
    return _offline(tmp_path_factory, plugin_on=False, bad_adapters=False)


@pytest.mark.slow
def test_offline_rows_pass_their_task_checks(offline_with_plugin):
    result, log = offline_with_plugin
    assert "Using LoRAExtPunicaWrapper." in log
    failed = [(r, t) for r, t in zip(result["rows"], result["texts"]) if not vllm_e2e.check(r, t)]
    assert not failed, failed
    assert {r["adapter"] for r in result["rows"]} == {None, *vllm_e2e.ADAPTERS}


@pytest.mark.slow
def test_offline_greedy_outputs_identical_without_plugin(offline_with_plugin, offline_without_plugin):
    (ours, _), (theirs, their_log) = offline_with_plugin, offline_without_plugin
    assert "Using PunicaWrapperCPU." in their_log and "LoRAExtPunicaWrapper" not in their_log
    assert ours["rows"] == theirs["rows"]
    assert ours["texts"] == theirs["texts"]


@pytest.mark.slow
def test_offline_bad_adapters_are_refused_and_the_engine_goes_on(offline_with_plugin):
    result, _ = offline_with_plugin
    errors = result["errors"]
    assert set(errors) == set(vllm_e2e.BAD_CASES)
    assert "LoRA rank 16 is greater than max_lora_rank 8" in errors["rank_too_large"]
    assert "No adapter found" in errors["missing_folder"]
    assert errors["wrong_model"] is not None, "vLLM accepted an adapter for a wider model"
    assert result["texts_after_errors"] == result["texts"]


# ---------------------------------------------------------------------------
# Served: vLLM's OpenAI-compatible server on 127.0.0.1, the openai client.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    folder = vllm_e2e.model_folder()
    modules = [f"{name}={vllm_e2e.ADAPTER_DIR / name}" for name in vllm_e2e.ADAPTERS]
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", folder, "--served-model-name", "base",
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "0",
        "--enable-lora", "--max-loras", "4", "--max-lora-rank", str(vllm_e2e.MAX_LORA_RANK),
        "--lora-modules", *modules,
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = dict(os.environ, LORA_EXT_VLLM="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    with open(log_path, "w") as log:
        # Own process group, so stopping it also stops the engine processes it spawned.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"vLLM server exited:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vLLM server not ready in {ENGINE_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}"
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(1)
        yield client, port, log_path
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _ask(client, model: str, prompt: str, max_tokens: int) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": vllm_e2e.llm.SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    return reply.choices[0].message.content


@pytest.mark.slow
def test_served_concurrent_requests_per_adapter_and_base(server):
    client, _, log_path = server
    served = {m.id for m in client.models.list().data}
    assert {"base", *vllm_e2e.ADAPTERS} <= served, served
    rows = vllm_e2e.batch(rows_per_adapter=2, seed=1)

    def run(row):
        model = row["adapter"] or "base"
        tokens = vllm_e2e.tasks.get_task(row["adapter"]).max_new_tokens if row["adapter"] else 16
        return _ask(client, model, row["prompt"], tokens)

    with ThreadPoolExecutor(max_workers=len(rows)) as pool:
        texts = list(pool.map(run, rows))
    failed = [(r, t) for r, t in zip(rows, texts) if not vllm_e2e.check(r, t)]
    assert not failed, failed
    assert "Using LoRAExtPunicaWrapper." in log_path.read_text()


@pytest.mark.slow
def test_served_bad_adapters_get_errors_while_others_are_served(server, tmp_path):
    import openai

    client, port, _ = server
    bad_dir = tmp_path / "bad"
    vllm_e2e.make_bad_adapters(bad_dir)
    rows = vllm_e2e.batch(rows_per_adapter=1, seed=2)

    def load(case):
        # vLLM's runtime adapter loading; each bad adapter must be refused with an error.
        import urllib.error
        import urllib.request

        body = json.dumps({"lora_name": f"bad-{case}", "lora_path": str(bad_dir / case)}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/load_lora_adapter", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def good(row):
        model = row["adapter"] or "base"
        tokens = vllm_e2e.tasks.get_task(row["adapter"]).max_new_tokens if row["adapter"] else 16
        return _ask(client, model, row["prompt"], tokens)

    with ThreadPoolExecutor(max_workers=len(rows) + len(vllm_e2e.BAD_CASES)) as pool:
        loads = {case: pool.submit(load, case) for case in vllm_e2e.BAD_CASES}
        answers = [pool.submit(good, row) for row in rows]
        statuses = {case: f.result() for case, f in loads.items()}
        texts = [f.result() for f in answers]
    for case, (status, body) in statuses.items():
        assert status >= 400, (case, status, body)
    assert "greater than max_lora_rank" in statuses["rank_too_large"][1]
    failed = [(r, t) for r, t in zip(rows, texts) if not vllm_e2e.check(r, t)]
    assert not failed, failed
    # A request naming an adapter that was refused is an error too; the server stays up.
    with pytest.raises(openai.NotFoundError):
        _ask(client, "bad-rank_too_large", "apple", 4)
    assert good(rows[0]) == texts[0]
