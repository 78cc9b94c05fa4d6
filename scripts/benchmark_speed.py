"""Tokens/s and peak memory of our SimPO preference stage against TRL's CPOTrainer (SimPO).

Three runs of one synthetic workload, each in a fresh process, one after another:

    simpo (packed, chunked)       `simpo preference` with its defaults
    simpo (padded, full logits)   the same with padding_free=false, logps_chunk_size=0
    TRL CPOTrainer simpo          trl.experimental.cpo.CPOTrainer, loss_type="simpo",
                                  cpo_alpha=0 (no NLL term), the same beta and gamma

The workload, built into the work folder: a word-level tokenizer (words w0, w1, ... and chat
markers, one token each, so a sequence's length follows exactly from its word counts);
preference pairs in JSONL, which both trainers read as they are (prompt: a user message;
chosen, rejected: one assistant message each; prompt lengths uniform, response lengths
log-normal); and a seeded Llama-architecture model saved once in fp32, which every run loads.
Every run trains the same batch, steps, learning rate and seed: no evaluation, no checkpoints,
nothing truncated, fp32 on CPU and bf16 mixed precision on GPU.

What is measured, identically in every run: the child process wraps `transformers.Trainer.train`
(both trainers inherit it) and the training sampler.
- tokens/s: the non-padding tokens (prompt + response, chosen and rejected) of the pairs trained
  from the end of step 1 to the end of the last step, over the time between those two step ends.
  Step 1 (allocator growth, lazy initialisation) is left out. The pairs are the ones the sampler
  handed out; their token counts come from the data, the same way for every run.
- peak memory: on CPU, the peak resident set during train() (sampled every 2 ms) above the
  resident set just before it; on GPU, torch's peak allocated memory during train() (weights,
  gradients and optimizer state included).

    python scripts/benchmark_speed.py            # the default workload (~20M parameters)
    python scripts/benchmark_speed.py --quick    # smoke test: a tiny model, seconds per run
    python scripts/benchmark_speed.py --steps 50 --work-dir /tmp/bench --output bench.md

It prints a markdown table with the ratios ours / TRL and writes it to --output (default
WORK_DIR/benchmark.md), with the numbers as JSON beside it. Run it on an otherwise idle machine:
on a few CPU cores, another busy process changes tokens/s several-fold (memory hardly moves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, "<|user|>", "<|assistant|>", "<|end|>"]
# A sequence renders as: BOS <|user|> prompt words <|end|> <|assistant|> response words EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} <|end|> "
    "{% elif message['role'] == 'assistant' %}"
    "<|assistant|> {{ message['content'] }} {{ eos_token }} "
    "{% else %}{{ raise_exception('only user and assistant messages') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
TEMPLATE_TOKENS = 5  # per sequence: BOS, <|user|>, <|end|>, <|assistant|>, EOS
BETA, GAMMA_BETA_RATIO = 2.0, 0.5  # SimPO's; TRL takes the margin as gamma = beta * ratio

TRL_RUN = "TRL CPOTrainer simpo"
# run name -> ("simpo", its --set overrides) or ("trl", None)
RUNS: dict[str, tuple[str, list[str] | None]] = {
    "simpo (packed, chunked)": ("simpo", []),
    "simpo (padded, full logits)": (
        "simpo",
        ["preference.training.padding_free=false", "preference.training.logps_chunk_size=0"],
    ),
    TRL_RUN: ("trl", None),
}
QUICK = {
    "vocab": 2000,
    "hidden": 64,
    "intermediate": 192,
    "layers": 2,
    "heads": 4,
    "steps": 8,
    "prompt_max": 32,
    "response_median": 30,
    "response_max": 100,
}


# --------------------------------------------------------------------------- the workload


def build_tokenizer(vocab: int, folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIAL_TOKENS + [f"w{i}" for i in range(vocab)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL_TOKENS)  # markers are split out wherever they stand
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_pairs(args: argparse.Namespace, path: Path) -> list[int]:
    """Write the pairs; return each pair's non-padding tokens (chosen + rejected sequences)."""
    rng = random.Random(args.seed)
    words = [f"w{i}" for i in range(args.vocab)]

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    def response_length() -> int:
        n = round(rng.lognormvariate(math.log(args.response_median), args.response_sigma))
        return min(max(n, 1), args.response_max)

    tokens = []
    with path.open("w") as f:
        for _ in range(args.pairs):
            prompt = rng.randint(args.prompt_min, args.prompt_max)
            chosen, rejected = response_length(), response_length()
            row = {
                "prompt": [{"role": "user", "content": text(prompt)}],
                "chosen": [{"role": "assistant", "content": text(chosen)}],
                "rejected": [{"role": "assistant", "content": text(rejected)}],
            }
            f.write(json.dumps(row) + "\n")
            tokens.append(2 * (prompt + TEMPLATE_TOKENS) + chosen + rejected)
    return tokens


def check_token_count(tokenizer, path: Path) -> None:
    """The first pair's chosen sequence has the length the token counts assume."""
    row = json.loads(path.read_text().split("\n", 1)[0])
    text = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    found = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    words = sum(len(m["content"].split()) for m in row["prompt"] + row["chosen"])
    assert found == words + TEMPLATE_TOKENS, (found, words)


def build_model(args: argparse.Namespace, tokenizer, folder: Path) -> dict[str, int]:
    """Save a seeded Llama model in fp32; return its parameter counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    # The input embedding is a lookup: no multiply-adds, left out of the FLOP estimate.
    return {"total": total, "matmul": total - model.get_input_embeddings().weight.numel()}


def training_settings(args: argparse.Namespace, on_gpu: bool) -> dict:
    """What both sides train with, under the names our recipe and TrainingArguments share."""
    return {
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": args.steps,
        "seed": args.seed,
        "bf16": on_gpu,
    }


def write_recipe(args: argparse.Namespace, work: Path, training: dict) -> Path:
    import yaml

    recipe = {
        "description": "scripts/benchmark_speed.py: the preference stage on a synthetic workload",
        "model": {
            "init": "pretrained",
            "name_or_path": str(work / "model"),
            "tokenizer": str(work / "tokenizer"),
            "dtype": "float32",
            "attn_implementation": args.attn,
        },
        "pipeline": ["preference"],
        "preference": {
            "loss": "simpo",
            "beta": BETA,
            "gamma_beta_ratio": GAMMA_BETA_RATIO,
            "data": {
                "train": str(work / "pairs.jsonl"),
                "max_length": args.max_length,
                # The longest prompt: nothing is cut (max_length holds any pair too).
                "max_prompt_length": args.prompt_max + TEMPLATE_TOKENS - 1,
            },
            # save_steps past the last step: no checkpoint (the stage's final save_model comes
            # after train(), outside the measurement).
            "training": {**training, "warmup_ratio": 0.0, "save_steps": args.steps + 1},
        },
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the child process


class RecordingSampler(torch.utils.data.Sampler):
    """The trainer's own sampler, unchanged, noting every index it hands out: one list per
    pass over the data (epoch)."""

    def __init__(self, inner, epochs: list[list[int]]):
        self.inner = inner
        self.epochs = epochs

    def __iter__(self):
        seen: list[int] = []
        self.epochs.append(seen)
        for index in self.inner:
            seen.append(int(index))
            yield index

    def __len__(self) -> int:
        return len(self.inner)


class StepClock(transformers.TrainerCallback):
    """The time at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels have finished, not just been queued
        self.times.append(time.perf_counter())


class PeakMemory:
    """Peak memory of a block: on GPU torch's peak allocated bytes; on CPU the peak resident
    set, sampled every 2 ms, above the resident set at the start."""

    def __enter__(self) -> PeakMemory:
        self.bytes = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.bytes = torch.cuda.max_memory_allocated()
            return
        self._done.set()
        self._thread.join()
        self.bytes = max(self._peak, self._process.memory_info().rss) - self._start


def instrument_trainer(result: dict) -> None:
    """Measure every Trainer.train() of this process into `result`. Both trainers inherit
    train() and _get_train_sampler() from transformers.Trainer unchanged, so patching the base
    class measures them alike."""
    train, make_sampler = transformers.Trainer.train, transformers.Trainer._get_train_sampler
    epochs: list[list[int]] = []

    def recording_sampler(self, *args, **kwargs):
        return RecordingSampler(make_sampler(self, *args, **kwargs), epochs)

    def measured_train(self, *args, **kwargs):
        clock = StepClock()
        # Our stage builds its Trainer inside `simpo preference`, out of reach of a callbacks
        # argument: the clock joins as train() starts, the same way for both trainers.
        self.add_callback(clock)
        with PeakMemory() as memory:
            output = train(self, *args, **kwargs)
        result.update(step_ends=clock.times, epochs=epochs, memory_bytes=memory.bytes)
        return output

    transformers.Trainer.train = measured_train
    transformers.Trainer._get_train_sampler = recording_sampler


def run_ours(spec: dict) -> None:
    """`simpo preference RECIPE` in this process, through the CLI (one process: no relaunch)."""
    from simpo_cli.cli import app

    work = Path(spec["work"])
    sets = [arg for text in spec["sets"] for arg in ("--set", text)]
    command = ["preference", str(work / "recipe.yaml"), "--output-dir", spec["output_dir"]]
    app([*command, "--overwrite", *sets], standalone_mode=False)


def run_trl(spec: dict) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    work = Path(spec["work"])
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    config = CPOConfig(
        output_dir=spec["output_dir"],
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=BETA,
        simpo_gamma=BETA * GAMMA_BETA_RATIO,
        max_length=spec["max_length"],
        warmup_steps=0,
        save_strategy="no",
        report_to="none",
        activation_checkpointing=False,  # TRL's default is on; ours is off
        **spec["training"],
    )
    model = AutoModelForCausalLM.from_pretrained(
        work / "model", dtype=torch.float32, attn_implementation=spec["attn"]
    )
    trainer = CPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(work / "tokenizer"),
    )
    trainer.train()


def child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result: dict = {}
    instrument_trainer(result)
    if spec["kind"] == "simpo":
        run_ours(spec)
    else:
        run_trl(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------- the parent


def run(name: str, index: int, args: argparse.Namespace, work: Path, training: dict) -> dict:
    """One run in a fresh process; its measurements, raw."""
    kind, sets = RUNS[name]
    slug = f"run{index}-{kind}"
    spec = {
        "kind": kind,
        "sets": sets,
        "work": str(work),
        "output_dir": str(work / "runs" / slug),
        "result": str(work / f"{slug}.result.json"),
        "training": training,
        "attn": args.attn,
        "max_length": args.max_length,
    }
    spec_path = work / f"{slug}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log = work / f"{slug}.log"
    print(f"[{index}/{len(RUNS)}] {name}: running (log {log})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, __file__, "--child", str(spec_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        ).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        sys.exit(f"{name} failed (exit {code}); the end of {log}:\n{tail}")
    return {**json.loads(Path(spec["result"]).read_text()), "wall_seconds": wall}


def summarize(raw: dict, pair_tokens: list[int], batch: int) -> dict:
    """tokens/s from the end of step 1 to the end of the last step, and peak memory."""
    # The DataLoader batches the sampler's indices in order, `batch` at a time, per epoch.
    batches = [e[i : i + batch] for e in raw["epochs"] for i in range(0, len(e), batch)]
    ends = raw["step_ends"]
    timed = batches[1 : len(ends)]  # steps 2..N; the sampler may have run one batch ahead
    tokens = sum(pair_tokens[p] for pairs in timed for p in pairs)
    seconds = ends[-1] - ends[0]
    return {
        "steps_timed": len(timed),
        "tokens_timed": tokens,
        "seconds_timed": seconds,
        "tokens_per_s": tokens / seconds,
        "memory_bytes": raw["memory_bytes"],
        "wall_seconds": raw["wall_seconds"],
    }


def table(results: dict[str, dict], mfu_of: Callable[[float], float] | None) -> list[str]:
    base = results[TRL_RUN]
    header = "| run | tokens/s | peak memory | tokens/s vs TRL | memory vs TRL |"
    rule = "| --- | --- | --- | --- | --- |"
    if mfu_of is not None:
        header, rule = header + " MFU (rough) |", rule + " --- |"
    lines = [header, rule]
    for name, r in results.items():
        line = (
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['memory_bytes'] / 2**20:,.0f} MiB | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['memory_bytes'] / base['memory_bytes']:.2f}x |"
        )
        lines.append(line + (f" {mfu_of(r['tokens_per_s']):.1%} |" if mfu_of else ""))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    quick = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in QUICK.items())
    add("--quick", action="store_true", help=f"smoke-test sizes: {quick} (flags override them)")
    add("--work-dir", type=Path, help="where the workload and logs go; default: a new temp folder")
    add(
        "--output", type=Path, help="markdown table (JSON beside it); default WORK_DIR/benchmark.md"
    )
    workload = parser.add_argument_group("workload")
    workload.add_argument("--vocab", type=int, default=32000, help="words (%(default)s)")
    workload.add_argument("--pairs", type=int, help="pairs to write; default batch x steps")
    workload.add_argument("--prompt-min", type=int, default=16, help="words (%(default)s)")
    workload.add_argument("--prompt-max", type=int, default=128, help="words (%(default)s)")
    workload.add_argument(
        "--response-median", type=float, default=120, help="words, log-normal (%(default)s)"
    )
    workload.add_argument(
        "--response-sigma", type=float, default=0.7, help="of log(words) (%(default)s)"
    )
    workload.add_argument("--response-max", type=int, default=700, help="words (%(default)s)")
    workload.add_argument(
        "--seed", type=int, default=42, help="of data, model and training (%(default)s)"
    )
    model = parser.add_argument_group("model (Llama architecture, untied embeddings)")
    model.add_argument("--hidden", type=int, default=256, help="(%(default)s)")
    model.add_argument("--intermediate", type=int, default=768, help="(%(default)s)")
    model.add_argument("--layers", type=int, default=4, help="(%(default)s)")
    model.add_argument("--heads", type=int, default=4, help="(%(default)s)")
    train = parser.add_argument_group("training (the same for every run)")
    train.add_argument("--batch", type=int, default=4, help="pairs per step (%(default)s)")
    train.add_argument(
        "--steps", type=int, default=20, help="optimizer steps; step 1 untimed (%(default)s)"
    )
    train.add_argument("--lr", type=float, default=1e-6, help="constant (%(default)s)")
    train.add_argument(
        "--max-length", type=int, default=1024, help="tokens per sequence (%(default)s)"
    )
    train.add_argument(
        "--attn",
        choices=["eager", "sdpa", "flash_attention_2"],
        help="attention kernel; default flash_attention_2 on GPU when installed, else sdpa",
    )
    train.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="GPU peak TFLOP/s (%(default)s: H100/H200 dense bf16) for a rough MFU = 6 x "
        "parameters (less the input embedding) x tokens/s / peak; attention FLOPs are not "
        "counted",
    )
    add("--child", type=Path, help=argparse.SUPPRESS)  # a run's spec: run it in this process
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.child is not None:
        return args
    args.pairs = args.pairs or args.batch * args.steps
    longest = args.prompt_max + args.response_max + TEMPLATE_TOKENS
    problems = [
        (args.steps < 2, "--steps: at least 2 (step 1 is not timed)"),
        (args.prompt_min > args.prompt_max, "--prompt-min: above --prompt-max"),
        (args.hidden % args.heads != 0, "--hidden: not a multiple of --heads"),
        (longest > args.max_length, f"--max-length: below the longest pair ({longest} tokens)"),
    ]
    for bad, message in problems:
        if bad:
            parser.error(message)
    if args.attn is None:
        from transformers.utils import is_flash_attn_2_available

        gpu_fa2 = torch.cuda.is_available() and is_flash_attn_2_available()
        args.attn = "flash_attention_2" if gpu_fa2 else "sdpa"
    return args


def main() -> None:
    args = parse_args()
    if args.child is not None:
        child(args.child)
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="simpo-benchmark-"))
    work.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    tokenizer = build_tokenizer(args.vocab, work / "tokenizer")
    pair_tokens = build_pairs(args, work / "pairs.jsonl")
    check_token_count(tokenizer, work / "pairs.jsonl")
    params = build_model(args, tokenizer, work / "model")
    training = training_settings(args, on_gpu)
    write_recipe(args, work, training)
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(
        f"workload in {work}: {params['total'] / 1e6:.1f}M parameters, {args.pairs} pairs "
        f"({sum(pair_tokens) / len(pair_tokens):.0f} tokens each on average), {args.steps} "
        f"steps of {args.batch} pairs, {args.attn}, {device}",
        file=sys.stderr,
        flush=True,
    )

    results = {}
    for index, name in enumerate(RUNS, start=1):
        results[name] = summarize(run(name, index, args, work, training), pair_tokens, args.batch)
        r = results[name]
        print(
            f"[{index}/{len(RUNS)}] {name}: finished in {r['wall_seconds']:.0f} s "
            f"({r['seconds_timed']:.1f} s timed, {r['tokens_per_s']:,.0f} tokens/s)",
            file=sys.stderr,
            flush=True,
        )

    def mfu(tokens_per_s: float) -> float:
        return 6 * params["matmul"] * tokens_per_s / (args.peak_tflops * 1e12)

    memory = (
        "peak GPU memory allocated during train()"
        if on_gpu
        else "peak resident memory during train() above that before it"
    )
    trl = results[TRL_RUN]
    lines = [
        *table(results, mfu if on_gpu else None),
        "",
        f"{device}, {'bf16 mixed precision' if on_gpu else 'fp32'}, {args.attn}; "
        f"{params['total'] / 1e6:.1f}M-parameter Llama ({args.layers} layers, hidden "
        f"{args.hidden}, vocabulary {len(tokenizer)}); {args.steps} steps of {args.batch} pairs, "
        f"steps 2-{args.steps} timed ({trl['tokens_timed']:,} tokens in TRL's run). "
        f"tokens/s: non-padding prompt + response tokens of chosen and rejected; peak memory: "
        f"{memory}.",
    ]
    print("\n".join(lines))
    output = args.output or work / "benchmark.md"
    output.write_text("\n".join(lines) + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"settings": settings, "device": device, "parameters": params, "runs": results}
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output} and {output.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
