"""speed: tokens/s, peak memory and MFU of our preference stage against TRL's CPOTrainer
(loss_type simpo) on the GPU, with scripts/benchmark_speed.py's workload and measurements.

The workload: a Llama-architecture model built from a config (about 1B parameters: hidden
2048, 16 layers, 32k vocabulary, untied embeddings; TinyLlama's shape), word-level synthetic
pairs (prompts of 16-128 tokens, log-normal responses, median 120), 8 pairs per step, 16 steps,
steps 2-16 timed, bf16 mixed precision, flash_attention_2 when installed. Two runs, each in a
fresh process: `simpo preference` with its defaults (packed, chunked log-probs) and TRL.
Passes when ours reaches at least TRL's tokens/s in no more peak memory (the speed and memory
the README reports on the CPU). MFU = 6 x parameters (less the input embedding) x tokens/s /
989 TFLOP/s (H100/H200 dense bf16); attention FLOPs are not counted. With --tiny (the quick
workload, on whatever the stand-in device is) the numbers are reported, not judged.
"""

from __future__ import annotations

import math

from gpu_checks import common
from gpu_checks.common import Context, Findings

LIMIT_S = 110
FULL = "--vocab 32000 --hidden 2048 --intermediate 5632 --layers 16 --heads 16 --batch 8 --steps 16"
TINY = "--quick --steps 3"
OURS = "simpo (packed, chunked)"
MIN_SPEEDUP = 1.0  # our tokens/s over TRL's
MAX_MEMORY_RATIO = 1.0  # our peak memory over TRL's


def run(ctx: Context) -> Findings:
    common.need("trl", "pip install 'simpo-cli[gpu]'")
    import importlib.util

    import benchmark_speed as bench  # scripts/, put on sys.path by scripts/gpu_check.py

    on_gpu = common.DEVICE == "cuda"
    flash = on_gpu and importlib.util.find_spec("flash_attn") is not None
    work = ctx.work
    attn = "flash_attention_2" if flash else "sdpa"
    flags = (TINY if ctx.tiny else FULL).split() + ["--attn", attn, "--work-dir", str(work)]
    args = bench.parse_args(flags)
    tokenizer = bench.build_tokenizer(args.vocab, work / "tokenizer")
    pair_tokens = bench.build_pairs(args, work / "pairs.jsonl")
    bench.check_token_count(tokenizer, work / "pairs.jsonl")
    params = bench.build_model(args, tokenizer, work / "model")
    training = bench.training_settings(args, on_gpu)
    bench.write_recipe(args, work, training)
    results = {}
    for index, name in enumerate((OURS, bench.TRL_RUN), start=1):
        raw = bench.run(name, index, args, work, training)
        results[name] = bench.summarize(raw, pair_tokens, args.batch)
    ours, trl = results[OURS], results[bench.TRL_RUN]
    speedup = ours["tokens_per_s"] / trl["tokens_per_s"]
    memory = ours["memory_bytes"] / trl["memory_bytes"]

    def mfu(tokens_per_s: float) -> float:
        return 6 * params["matmul"] * tokens_per_s / (args.peak_tflops * 1e12)

    found = Findings()
    ours_mfu, trl_mfu = mfu(ours["tokens_per_s"]), mfu(trl["tokens_per_s"])
    found.note(
        f"{params['total'] / 1e6:.3g}M parameters, {args.attn}: {ours['tokens_per_s']:,.0f} "
        f"tokens/s = {speedup:.2f}x TRL's {trl['tokens_per_s']:,.0f}, MFU {ours_mfu:.1%} "
        f"(TRL {trl_mfu:.1%}), peak memory {memory:.2f}x TRL's"
    )
    # --tiny: a model of a few hundred thousand parameters, whose speed says nothing.
    least, most = (0.0, math.inf) if ctx.tiny else (MIN_SPEEDUP, MAX_MEMORY_RATIO)
    found.expect(speedup >= least, f"tokens/s {speedup:.2f}x TRL's (needs {least}x)")
    found.expect(memory <= most, f"peak memory {memory:.2f}x TRL's (at most {most}x)")
    found.numbers.update(
        parameters=params["total"],
        attn=args.attn,
        tokens_per_s=ours["tokens_per_s"],
        trl_tokens_per_s=trl["tokens_per_s"],
        tokens_per_s_ratio=speedup,
        mfu=ours_mfu,
        trl_mfu=trl_mfu,
        peak_memory_mib=ours["memory_bytes"] / 2**20,
        trl_peak_memory_mib=trl["memory_bytes"] / 2**20,
        memory_ratio=memory,
        peak_tflops=args.peak_tflops,
    )
    return found
