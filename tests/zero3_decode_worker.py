"""Run by tests/test_launch.py::test_zero3_processes_decode_alone_between_training_steps under 2
processes (torchrun): a DeepSpeed ZeRO-3 engine (every parameter partitioned) takes two steps,
then each process decodes greedily on its own, for a number of tokens of its own (3 on rank 0, 9
on rank 1: under ZeRO-3's hooks the processes would wait on each other's gathers forever), inside
simpo_cli's whole_for_decoding; then the engine trains on. A model without DeepSpeed holding the
engine's weights (gathered whole) is the reference. Each process checks that its tokens equal that
model's greedy tokens, that DeepSpeed's hooks are back on every module as they were, and that
the losses of the next two steps equal that model's on the same batches; it prints one line and
exits 1 on a mismatch. (Layers in flight from a prefetch, which whole_for_decoding waits for, are
not made to happen here: the Trainer's evaluation left some; this engine's steps leave none.)"""

import sys

import deepspeed
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_logps import VOCAB, _model  # noqa: E402

from simpo_cli.model.load import whole_for_decoding  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    # Nothing kept whole between uses (a tiny model would otherwise stay gathered after the
    # first step, and nothing would need to be gathered while decoding); layers prefetched.
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_max_live_parameters": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 1000000,
    },
    "zero_allow_untested_optimizer": True,
}
NEW_TOKENS = (3, 9)


def batch(rank: int, step: int) -> torch.Tensor:
    seed = 100 * step + rank
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    engine, *_ = deepspeed.initialize(
        model=_model("llama", "sdpa"),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        config=CONFIG,
    )
    plain = _model("llama", "sdpa")

    def step(number: int) -> float:
        """The engine's loss of a step, averaged over the processes."""
        ids = batch(rank, number)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        return mean.item() / world

    def plain_loss(number: int) -> float:
        """The reference's loss on the same batches, with the engine's weights as they are."""
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            plain.load_state_dict(
                {n: p.detach().clone() for n, p in engine.module.named_parameters()}, strict=False
            )
        with torch.no_grad():
            losses = [plain(input_ids=batch(r, number), labels=batch(r, number)).loss
                      for r in range(world)]  # fmt: skip
        return sum(loss.item() for loss in losses) / world

    step(1), step(2)
    engine.eval()
    with torch.no_grad():  # held-out batches, as before the stage's greedy check
        for number in (-1, -2):
            engine(input_ids=batch(rank, number), labels=batch(rank, number))
    prompt = batch(rank, 0)[:1, :5]
    new = NEW_TOKENS[rank]
    greedy = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}

    def hooks() -> list[tuple[int, int]]:
        return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in engine.module.modules()]

    before = hooks()
    with whole_for_decoding(engine.module, engine), torch.no_grad():
        decoded = engine.module.generate(prompt, **greedy)[0, 5:].tolist()
    engine.train()
    reference = plain_loss(3)  # the weights of the decoding
    with torch.no_grad():
        expected = plain.generate(prompt, **greedy)[0, 5:].tolist()
    diffs = [abs(step(3) - reference)]
    reference = plain_loss(4)
    diffs.append(abs(step(4) - reference))
    restored = hooks() == before
    ok = decoded == expected and len(decoded) == new and max(diffs) < 1e-5 and restored
    same = "equal" if decoded == expected else "DIFFERENT"
    print(f"rank {rank}: decoded {len(decoded)} tokens {same}, hooks "
          f"{'restored' if restored else 'NOT RESTORED'}, next steps' loss diff "
          f"{max(diffs):.1e} {'ok' if ok else 'MISMATCH'}", flush=True)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
