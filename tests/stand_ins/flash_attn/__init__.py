"""A stand-in for flash-attn (tests/gpu_stand_in.py puts it on sys.path with its package
metadata): its two kernels' signatures, computed on any device with torch's
scaled_dot_product_attention, one sequence at a time for the variable-length one. Enough for
transformers' flash_attention_2 path, packed rows with cu_seq_lens included."""

import torch
import torch.nn.functional as F

__version__ = "2.8.3"
CALLS = {"varlen": 0, "dense": 0}  # kernel calls, for tests/gpu_stand_in.py's report


def _attend(q, k, v, causal: bool, softmax_scale):
    """q [L, H, D], k and v [L, Hkv, D] -> [L, H, D]; grouped-query heads repeated."""
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale).transpose(
        0, 1
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q [N, H, D], k and v [N, Hkv, D], the sequences' boundaries in cu_seqlens_q/k: each
    sequence attends to itself only."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k), "self-attention only"
    CALLS["varlen"] += 1
    bounds = cu_seqlens_q.tolist()
    segments = zip(bounds[:-1], bounds[1:], strict=True)
    return torch.cat([_attend(q[s:e], k[s:e], v[s:e], causal, softmax_scale) for s, e in segments])


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q [B, T, H, D], k and v [B, T, Hkv, D]."""
    CALLS["dense"] += 1
    return torch.stack(
        [_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])]
    )


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the flash-attn stand-in has no KV-cache kernel")
