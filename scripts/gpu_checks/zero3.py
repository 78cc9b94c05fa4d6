"""zero3: DeepSpeed ZeRO-3 on NCCL (the CPU tests run it on gloo).

With one GPU, ZeRO-3 runs in one process on an NCCL group of one: the partitioning, the gathers
and the hooks run on the GPU, communication between GPUs does not (say so in the summary);
with two or more GPUs, two processes, one per GPU. On a Llama-architecture model built from a
config, each process:
  1. float32: every parameter partitioned (lm_head included: no persistence threshold); the
     packed, chunked per-token mean log-probs (the chunks gather lm_head inside the model's
     forward) and the whole gradients gathered from the partitions equal those of the same
     weights without DeepSpeed on padded full logits, within 1e-4;
  2. bf16 (DeepSpeed's bf16, fp32 master weights in the optimizer): 8 AdamW steps of SimPO on
     a fixed packed batch lower the loss, and the 16-bit weights gathered for saving (what the
     Trainer saves under stage3_gather_16bit_weights_on_model_save) hold every weight whole
     and finite.
"""

from __future__ import annotations

import gc
import json
import socket
from pathlib import Path

import torch

from gpu_checks import common
from gpu_checks.common import Context, Findings

LIMIT_S = 60
FULL = {
    "vocab": 32000,
    "hidden": 512,
    "intermediate": 1536,
    "layers": 4,
    "heads": 8,
    "kv_heads": 4,
    "max_positions": 1024,
    "lengths": [300, 120, 260, 90],
    "chunk": 256,
}
TINY = {
    "vocab": 512,
    "hidden": 64,
    "intermediate": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "max_positions": 128,
    "lengths": [40, 16, 32, 12],
    "chunk": 16,
}
# lengths: chosen, chosen, rejected, rejected
STEPS = 8


def run(ctx: Context) -> Findings:
    common.need("deepspeed", "pip install deepspeed")
    world = 2 if torch.cuda.device_count() >= 2 else 1
    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if world == 1:
        worker(0, 1, port, ctx.tiny, str(ctx.work))
    else:
        torch.multiprocessing.spawn(
            worker, args=(world, port, ctx.tiny, str(ctx.work)), nprocs=world
        )
    ranks = [json.loads((ctx.work / f"rank{r}.json").read_text()) for r in range(world)]
    found = Findings(
        failures=[f"rank {r}: {f}" for r, got in enumerate(ranks) for f in got["failures"]]
    )
    first = ranks[0]
    where = (
        f"{world} processes on {common.DIST_BACKEND}"
        if world > 1
        else f"1 process on {common.DIST_BACKEND} (one GPU: no communication between GPUs)"
    )
    found.note(
        f"{where}: fp32 mean log-prob diff {first['logp_diff']:.1e}, grad diff "
        f"{first['grad_diff']:.1e}; bf16 SimPO loss {first['losses'][0]:.3f} -> "
        f"{first['losses'][-1]:.3f} in {STEPS} steps; {first['saved']} whole weights "
        "gathered to save"
    )
    found.numbers.update(processes=world, backend=common.DIST_BACKEND, **first)
    found.numbers.pop("failures")
    return found


def worker(rank: int, world: int, port: int, tiny: bool, work: str) -> None:
    """One process of the check; writes work/rank<rank>.json."""
    env = {
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    from simpo_cli.launch import environment  # put back after: the checks after this one

    with environment({k: str(v) for k, v in env.items()}):
        try:
            result = measure(rank, TINY if tiny else FULL)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    (Path(work) / f"rank{rank}.json").write_text(json.dumps(result))


def measure(rank: int, size: dict) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from simpo_cli.data import collate_sequences
    from simpo_cli.losses import simpo_loss
    from simpo_cli.train.logps import sequence_scores

    if common.DEVICE == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(common.DEVICE, rank) if common.DEVICE == "cuda" else torch.device("cpu")
    deepspeed.init_distributed(dist_backend=common.DIST_BACKEND)
    ids, labels = common.sequences(size["vocab"], size["lengths"])
    padded = collate_sequences(ids, labels, pad_token_id=0, padding_free=False)
    packed = collate_sequences(ids, labels, pad_token_id=0, padding_free=True)
    padded, packed = (
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        for b in (padded, packed)
    )
    failures = []

    # 1. float32: the same weights without DeepSpeed, padded, full logits; then under ZeRO-3.
    plain = common.llama(size, torch.float32, "sdpa").to(device)
    scores = sequence_scores(plain, padded, 0)
    (scores.sums / scores.counts).sum().backward()
    ref_sums = scores.sums.detach()
    ref_grads = {n: p.grad.detach().clone() for n, p in plain.named_parameters()}
    del plain, scores
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=common.llama(size, torch.float32, "sdpa"), optimizer=torch.optim.SGD, config=config
    )  # SGD: never stepped
    params = dict(engine.module.named_parameters())
    placeholders = sum(p.numel() == 0 and hasattr(p, "ds_id") for p in params.values())
    if placeholders != len(params):
        failures.append(f"{len(params) - placeholders} of {len(params)} parameters not partitioned")
    scores = sequence_scores(engine, packed, size["chunk"])
    engine.backward((scores.sums / scores.counts).sum())
    # Per-token means: float32 sums over hundreds of tokens have steps near 1e-4.
    logp_diff = (scores.sums.detach() / scores.counts - ref_sums / scores.counts).abs().max().item()
    grad_diff = max(
        (safe_get_full_grad(p) - ref_grads[n]).abs().max().item() for n, p in params.items()
    )
    if not (logp_diff < 1e-4 and grad_diff < 1e-4):
        failures.append(
            f"fp32 ZeRO-3 vs plain: mean log-prob diff {logp_diff:.1e}, gradient diff "
            f"{grad_diff:.1e} (limit 1e-4)"
        )
    engine.destroy()
    del engine, params, scores
    gc.collect()

    # 2. bf16 training steps, then the weights gathered whole for saving.
    config = {
        **config,
        "bf16": {"enabled": True},
        "zero_optimization": {
            **config["zero_optimization"],
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }
    engine, *_ = deepspeed.initialize(
        model=common.llama(size, torch.float32, "sdpa"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        config=config,
    )
    losses = []
    for _ in range(STEPS):
        scores = sequence_scores(engine, packed, size["chunk"])
        avg = scores.sums / scores.counts
        loss = simpo_loss(avg[:2], avg[2:], beta=2.0, gamma=1.0).losses.mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if not (all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]):
        failures.append(f"bf16 SimPO loss {losses[0]:.4f} -> {losses[-1]:.4f}: not lower")
    state = engine._zero3_consolidated_16bit_state_dict()  # every rank joins; rank 0 gets it
    saved = 0
    if rank == 0:
        shapes = {n: tuple(p.ds_shape) for n, p in engine.module.named_parameters()}
        bad = [
            n
            for n, shape in shapes.items()
            if n not in state
            or tuple(state[n].shape) != shape
            or state[n].dtype != torch.bfloat16
            or not torch.isfinite(state[n]).all()
        ]
        saved = len(shapes) - len(bad)
        if bad:
            failures.append(
                f"saved 16-bit weights: {len(bad)} missing, partial or not finite ({bad[0]}, ...)"
            )
    engine.destroy()
    return {
        "logp_diff": logp_diff,
        "grad_diff": grad_diff,
        "losses": losses,
        "saved": saved,
        "failures": failures,
    }
