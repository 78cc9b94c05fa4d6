"""Run by tests/test_launch.py::test_zero3_packed_chunked_logps_and_gradients under 2 processes
(torchrun): the models of tests/test_logps.py wrapped in a DeepSpeed ZeRO-3 engine with every
parameter partitioned (lm_head included: no persistence threshold), scored on packed batches with
chunked log-probs. Each process checks that the per-sequence log-probs and the full gradients
(gathered from the partitions) equal those of the same weights without DeepSpeed, on padded
batches with full logits, within 1e-5; it prints one line per model and exits 1 on a mismatch."""

import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_logps import WEIGHTS, _model, _reference, _sequences  # noqa: E402

from simpo_cli.data import collate_sequences  # noqa: E402
from simpo_cli.train.logps import sequence_scores  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,  # plain SGD, never stepped
}


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    failed = False
    for kind, attn in (("llama", "sdpa"), ("gemma2", "eager")):
        ids, labels = _sequences()
        plain = _model(kind, attn)
        ref_sums, _, ref_grads = _reference(plain, ids, labels)
        engine, *_ = deepspeed.initialize(
            model=_model(kind, attn),  # the same seeded weights
            optimizer=torch.optim.SGD,  # never stepped
            config=CONFIG,
        )
        head = engine.module.get_output_embeddings().weight
        assert head.ds_tensor.numel() < head.ds_numel, "lm_head is not partitioned"
        batch = collate_sequences(ids, labels, pad_token_id=0, padding_free=True)
        scores = sequence_scores(engine, batch, chunk_size=5)
        # Both processes score the same batch, so the averaged gradient is each one's own.
        engine.backward((scores.sums * WEIGHTS).sum())
        sums_diff = (scores.sums.detach() - ref_sums).abs().max().item()
        grad_diff = max(
            (safe_get_full_grad(p) - ref_grads[name]).abs().max().item()
            for name, p in engine.module.named_parameters()
        )
        ok = sums_diff < 1e-5 and grad_diff < 1e-5
        failed |= not ok
        print(f"rank {rank} {kind} {attn}: log-prob diff {sums_diff:.1e}, gradient diff "
              f"{grad_diff:.1e} {'ok' if ok else 'MISMATCH'}", flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
