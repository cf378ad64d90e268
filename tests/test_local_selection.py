"""`with use_adapter(...)` is local to the thread or asyncio task that entered it, however
it is entered; `set_adapter` is a plain, model-wide call. Every output is checked against the model run alone with
that adapter, so a selection leaking between threads or tasks changes the numbers."""

import asyncio
import contextlib
import pathlib
import threading

import pytest
import torch
from torch import nn

import lora_ext

ADAPTERS = ["a", "b", "c"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    for name in ADAPTERS:
        lora_ext.inject_lora(model, ["0", "2"], r=4, alpha=8, adapter_name=name, init="gaussian")
    for layer in model.modules():
        if isinstance(layer, lora_ext.LoRALinear):
            for name in ADAPTERS:
                layer.lora_B[name].data.normal_()  # B starts at zero: make every adapter matter
            layer.requires_grad_(False)
    return model.eval()


def _expected(model, x) -> dict:
    """Output of ``x`` per selection, computed alone in this thread."""
    out = {}
    for names in [None, *ADAPTERS, ("a", "b")]:
        lora_ext.set_adapter(model, list(names) if isinstance(names, tuple) else names)
        out[names] = model(x).clone()
    assert not torch.allclose(out["a"], out["b"]) and not torch.allclose(out["a"], out[None])
    return out


def _in_threads(target, args_per_thread):
    errors = []

    def run(*args):
        try:
            target(*args)
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=args) for args in args_per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def _helper(model, names):
    """A selection made in a helper function and entered by its caller."""
    return lora_ext.use_adapter(model, names)


@contextlib.contextmanager
def _entered(form: str, model, names):
    """``use_adapter`` entered in each way a program may enter it."""
    if form == "with":
        with lora_ext.use_adapter(model, names):
            yield
    elif form == "exitstack":
        with contextlib.ExitStack() as stack:
            stack.enter_context(lora_ext.use_adapter(model, names))
            yield
    elif form == "conditional":
        with (lora_ext.use_adapter(model, names) if names is not None else contextlib.nullcontext()):
            yield
    else:
        with _helper(model, names):
            yield


FORMS = ["with", "exitstack", "conditional", "helper"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_with_block_is_local_to_its_thread(compiled, form):
    model = _model()
    x = torch.randn(2, 16)
    expected = _expected(model, x)
    lora_ext.set_adapter(model, "c")  # model-wide
    run = torch.compile(model, backend="aot_eager") if compiled else model
    barrier = threading.Barrier(3)
    with torch.no_grad():
        run(x)  # compile outside the threads

        def serve(names):
            key = tuple(names) if isinstance(names, list) else names
            with _entered(form, model, names):
                barrier.wait(timeout=60)  # every thread is inside its block now
                for _ in range(20):
                    torch.testing.assert_close(run(x), expected[key], rtol=0, atol=0)
                barrier.wait(timeout=60)
            torch.testing.assert_close(run(x), expected["c"], rtol=0, atol=0)  # back to model-wide

        _in_threads(serve, [("a",), ("b",), (["a", "b"],)])
        torch.testing.assert_close(run(x), expected["c"], rtol=0, atol=0)


def test_plain_call_is_model_wide():
    model = _model()
    x = torch.randn(2, 16)
    expected = _expected(model, x)
    chosen = threading.Event()

    def choose():
        lora_ext.set_adapter(model, "b")
        chosen.set()

    with torch.no_grad():
        _in_threads(choose, [()])
        assert chosen.is_set()
        torch.testing.assert_close(model(x), expected["b"], rtol=0, atol=0)
        with lora_ext.use_adapter(model, "a"):
            torch.testing.assert_close(model(x), expected["a"], rtol=0, atol=0)
            lora_ext.set_adapter(model, "c")  # a plain call inside a block: this thread too
            torch.testing.assert_close(model(x), expected["c"], rtol=0, atol=0)
        torch.testing.assert_close(model(x), expected["c"], rtol=0, atol=0)


@pytest.mark.parametrize("form", FORMS)
def test_with_block_is_local_to_its_asyncio_task(form):
    model = _model()
    x = torch.randn(2, 16)
    expected = _expected(model, x)
    lora_ext.set_adapter(model, None)

    async def serve(name):
        with _entered(form, model, name):
            for _ in range(5):
                await asyncio.sleep(0)  # the other tasks enter their blocks in between
                torch.testing.assert_close(model(x), expected[name], rtol=0, atol=0)

    async def main():
        await asyncio.gather(*(serve(n) for n in ADAPTERS))

    with torch.no_grad():
        asyncio.run(main())
        torch.testing.assert_close(model(x), expected[None], rtol=0, atol=0)


@pytest.mark.parametrize("form", FORMS)
def test_compiled_model_in_asyncio_tasks(form):
    """Compiled forwards read the thread's choice of the last block entered or left: tasks
    that do not await inside their blocks each get their own selection."""
    model = _model()
    x = torch.randn(2, 16)
    expected = _expected(model, x)
    lora_ext.set_adapter(model, None)
    run = torch.compile(model, backend="aot_eager")

    async def serve(name):
        for _ in range(3):
            with _entered(form, model, name):
                torch.testing.assert_close(run(x), expected[name], rtol=0, atol=0)
            await asyncio.sleep(0)  # other tasks run their blocks in between

    async def main():
        await asyncio.gather(*(serve(n) for n in ADAPTERS))

    with torch.no_grad():
        run(x)
        asyncio.run(main())
        torch.testing.assert_close(run(x), expected[None], rtol=0, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_local_selection_of_a_deleted_adapter_falls_back_to_the_base(compiled):
    """The deleted adapter's slot is reused by a new one: the block must not pick it up."""
    model = _model()
    x = torch.randn(2, 16)
    expected = _expected(model, x)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    lora_ext.set_adapter(model, "a")
    with torch.no_grad(), lora_ext.use_adapter(model, ["b", "a"]):
        run(x)
        lora_ext.delete_adapter(model, "a")
        lora_ext.inject_lora(model, ["0", "2"], r=4, adapter_name="d", init="gaussian")
        for layer in model.modules():
            if isinstance(layer, lora_ext.LoRALinear):
                layer.lora_B["d"].data.normal_()
                assert layer.slot("d") == 0  # "a"'s old slot
        rows = run(x)
        torch.testing.assert_close(rows[0], expected["b"][0], rtol=0, atol=0)
        torch.testing.assert_close(rows[1], expected[None][1], rtol=0, atol=0)


def test_with_form_checks_names_and_changes_nothing_on_error():
    model = _model()
    lora_ext.set_adapter(model, "a")
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        with lora_ext.use_adapter(model, ["a", "zzz"]):
            pass
    assert lora_ext.active_adapters(model) == "a"
    with pytest.raises(RuntimeError, match="boom"):
        with lora_ext.use_adapter(model, "b"):
            raise RuntimeError("boom")
    assert lora_ext.active_adapters(model) == "a"


def test_set_adapter_is_not_a_context_manager():
    """`with set_adapter(...)` names use_adapter and puts the model-wide selection back."""
    model = _model()
    lora_ext.set_adapter(model, "a")
    with pytest.raises(TypeError, match="use_adapter"):
        with lora_ext.set_adapter(model, "b"):
            pass
    assert lora_ext.active_adapters(model) == "a"
    with pytest.raises(TypeError, match="use_adapter"):
        with contextlib.ExitStack() as stack:
            stack.enter_context(lora_ext.set_adapter(model, "c"))
    assert lora_ext.active_adapters(model) == "a"
    selection = lora_ext.set_adapter(model, "b")
    lora_ext.set_adapter(model, "c")  # changed again since: entering must not undo it
    with pytest.raises(TypeError, match="stays"):
        with selection:
            pass
    assert lora_ext.active_adapters(model) == "c"


def test_no_frame_inspection():
    """The selection never depends on the caller's code (no frame or bytecode reading)."""
    package = pathlib.Path(lora_ext.__file__).parent
    for path in package.rglob("*.py"):
        source = path.read_text()
        assert "_getframe" not in source and "import dis" not in source, path
