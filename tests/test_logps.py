"""Packed (padding-free) batches and chunked log-probs (logps.py, data.collate_sequences) against
the padded full-logits path: per-sequence log-probs and gradients within 1e-5 in fp32, on sdpa
and eager, a Llama-style and a Gemma-2-style model (final-logit softcapping, a sliding window
shorter than the sequences); and the loss of a step as the mean over its pairs however the
micro-batches split them. The 2-process ZeRO-3 equivalence is in test_launch.py
(test_two_processes_match_one)."""

import itertools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from simpo_cli.data import collate_sequences
from simpo_cli.losses import IGNORE_INDEX, sequence_logps
from simpo_cli.train.logps import chunking_problem, packing_problem, sequence_scores

VOCAB = 61
# Four sequences: prompt tokens untrained (-100), response tokens trained; the third has one
# trained token only, the fourth is the longest (past the Gemma-2 model's sliding window of 4).
LENGTHS, PROMPTS = [9, 5, 3, 14], [3, 2, 2, 4]


def _model(kind: str, attn: str):
    torch.manual_seed(0)
    sizes = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 64}  # fmt: skip
    if kind == "llama":
        config = AutoConfig.for_model("llama", tie_word_embeddings=True, **sizes)
    else:
        config = AutoConfig.for_model(
            "gemma2", head_dim=8, sliding_window=4, final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0, **sizes,
        )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()


def _sequences() -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    labels = [[IGNORE_INDEX] * p + row[p:] for row, p in zip(ids, PROMPTS, strict=True)]
    return ids, labels


def _reference(model, ids, labels):
    """Summed log-probs [S] and gradients from plain model(...).logits on the padded batch."""
    model.zero_grad()
    batch = collate_sequences(ids, labels, pad_token_id=0, padding_free=False)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    sums, counts = sequence_logps(logits, batch["labels"], average=False)
    (sums * WEIGHTS).sum().backward()
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


WEIGHTS = torch.tensor([1.0, -2.0, 3.0, 0.5])  # a loss that weighs each sequence differently


@pytest.mark.parametrize(
    ("kind", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("gemma2", "eager")]
)
def test_packed_and_chunked_equal_padded_full_logits(kind, attn):
    model = _model(kind, attn)
    ids, labels = _sequences()
    ref_sums, ref_counts, ref_grads = _reference(model, ids, labels)
    # Layouts: padded; packed into rows of the longest (sdpa, eager); packed into one row (what
    # flash-attention gets; sdpa and eager take it too). Chunk 5 does not divide the 20
    # trained tokens; chunk 1 is the smallest.
    layouts = [(False, False), (True, False), (True, True)]
    for (padding_free, one_row), chunk in itertools.product(layouts, [0, 1, 5]):
        model.zero_grad()
        batch = collate_sequences(ids, labels, 0, padding_free, one_row)
        scores = sequence_scores(model, batch, chunk)
        (scores.sums * WEIGHTS).sum().backward()
        where = f"padding_free={padding_free} one_row={one_row} chunk={chunk}"
        torch.testing.assert_close(scores.sums, ref_sums, rtol=0, atol=1e-5, msg=where)
        assert scores.counts.tolist() == ref_counts.tolist() == [6, 3, 1, 10]
        for name, param in model.named_parameters():
            torch.testing.assert_close(
                param.grad, ref_grads[name], rtol=0, atol=1e-5, msg=f"{where}: {name}"
            )
        with torch.no_grad():  # evaluation and the reference pre-pass: no recomputation
            again = sequence_scores(model, batch, chunk)
        torch.testing.assert_close(again.sums, ref_sums, rtol=0, atol=1e-5, msg=where)


def test_mean_logits_are_over_trained_positions_and_the_vocabulary():
    model = _model("gemma2", "eager")
    ids, labels = _sequences()
    batch = collate_sequences(ids, labels, pad_token_id=0, padding_free=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts the label at t + 1
    expected = [logits[s, :-1][mask[s]].mean().item() for s in range(len(ids))]
    for (padding_free, one_row), chunk in itertools.product(
        [(False, False), (True, False), (True, True)], [0, 5]
    ):
        packed = collate_sequences(ids, labels, 0, padding_free, one_row)
        with torch.no_grad():
            got = sequence_scores(model, packed, chunk).mean_logits
        assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_packed_layout_by_hand():
    """Two sequences [5 6 7] (prompt 5) and [8 9] (prompt 8) in one row: positions restarting,
    the second sequence's first label untrained, and the trained positions of the row are
    those whose next token is trained (never the last token of a sequence)."""
    ids, labels = [[5, 6, 7], [8, 9]], [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9]]
    batch = collate_sequences(ids, labels, pad_token_id=0, padding_free=True, one_row=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5] and batch["max_length"] == 3
    assert batch["token_index"].tolist() == [0, 1, 3]
    assert batch["token_targets"].tolist() == [6, 7, 9]
    assert batch["token_seq"].tolist() == [0, 0, 1]
    # A first label that is trained is still not a target: it would be predicted by the
    # previous sequence's last token.
    batch = collate_sequences([[5, 6], [8, 9]], [[5, 6], [8, 9]], 0, True, one_row=True)
    assert batch["labels"].tolist() == [[-100, 6, -100, 9]]
    assert batch["token_index"].tolist() == [0, 2]

    padded = collate_sequences(ids, labels, pad_token_id=0, padding_free=False)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["token_index"].tolist() == [0, 1, 3]  # row 1 starts at 3 in the [2 x 3] grid
    assert padded["token_seq"].tolist() == [0, 0, 1]


def test_packed_rows_are_as_long_as_the_longest_sequence():
    """Lengths 4, 2, 3, 1 and 2 (sequences 0 to 4) go into rows of 4 tokens, first fit, longest
    first: sequence 0 fills row 0; 2 opens row 1 (1 left); 1 opens row 2 (2 left); 4 fills row
    2; 3 fills row 1. Positions restart per sequence."""
    ids = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10], [11, 12]]
    labels = [[IGNORE_INDEX, *row[1:]] for row in ids]
    batch = collate_sequences(ids, labels, pad_token_id=0, padding_free=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 10], [5, 6, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert "cu_seq_lens" not in batch and "attention_mask" not in batch
    # Targets: 2 3 4 of sequence 0 (row 0), 8 9 of sequence 2 (row 1 from 4), 6 of sequence 1
    # (row 2 from 8), 12 of sequence 4 (row 2 from 10); sequence 3 has one token, no target.
    assert batch["token_index"].tolist() == [0, 1, 2, 4, 5, 8, 10]
    assert batch["token_targets"].tolist() == [2, 3, 4, 8, 9, 6, 12]
    assert batch["token_seq"].tolist() == [0, 0, 0, 2, 2, 1, 4]
    # A row that is not full ends in padding, a segment of its own that trains nothing.
    batch = collate_sequences([[1, 2, 3], [4, 5]], [[-100, 2, 3], [-100, 5]], 0, True)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]


def test_packing_without_isolation_would_differ():
    """The equivalence above can fail: the same packed row run with an all-ones attention mask
    (which turns transformers' packed-sequence detection off) lets the second sequence attend to
    the first, and its log-prob moves far beyond the tolerance."""
    model = _model("llama", "sdpa")
    ids, labels = _sequences()
    batch = collate_sequences(ids, labels, pad_token_id=0, padding_free=True, one_row=True)
    with torch.no_grad():
        isolated = sequence_scores(model, batch, 0).sums
        leaky = model(
            input_ids=batch["input_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits[0]
    picked = leaky.index_select(0, batch["token_index"]).log_softmax(-1)
    per_token = picked.gather(1, batch["token_targets"][:, None]).squeeze(1)
    leaky_sums = torch.zeros(4).index_add(0, batch["token_seq"], per_token)
    assert (leaky_sums[1:] - isolated[1:]).abs().max() > 1e-2
    assert (leaky_sums[0] - isolated[0]).abs() < 1e-5  # the first sequence sees nothing before


def test_models_that_cannot_pack_or_chunk_are_named():
    llama = _model("llama", "sdpa")
    assert packing_problem(llama) is None and chunking_problem(llama) is None
    bloom = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("bloom", vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)
    )
    assert packing_problem(bloom) == "BloomForCausalLM takes no position_ids"
    cohere = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "cohere",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            logit_scale=0.0625,
        )  # fmt: skip
    )
    assert chunking_problem(cohere) == "cohere rescales its logits (logit_scale=0.0625)"
