"""Generation: prompts, one-BOS rendering, seeded sampling, resumable shards, the vLLM boundary.

The model is the tiny recipe's seeded random model (its replies are noise, which is fine: the
tests compare samples, not their quality); 8 new tokens per sample keep every run under a
second. Subprocess tests (kill -9, two processes) run the real module in fresh interpreters.
"""

import hashlib
import importlib.machinery
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from simpo_cli.errors import DataError, UserError
from simpo_cli.onpolicy import sampling as generation
from simpo_cli.onpolicy.sampling import (
    Prompt,
    SamplingSettings,
    TransformersBackend,
    VLLMBackend,
    generate_samples,
    merge_shards,
    read_prompts,
    render_prompt_ids,
    request_seed,
    resolve_backend,
    resolve_seeds,
    shard_path,
    split_prompts,
    stop_token_ids,
)
from simpo_cli.recipe import RECIPES_DIR, DataSource, load_recipe

EVAL_PAIRS = RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl"
BOS, EOT = 0, 4
SETTINGS = SamplingSettings(seeds=(13, 21), max_new_tokens=8, stop_token_ids=(EOT,))


@pytest.fixture(scope="module")
def model():
    from simpo_cli.model.load import load_model

    return load_model(load_recipe("tiny"), None, 42)


@pytest.fixture(scope="module")
def prompts():
    return read_prompts(DataSource(path=str(EVAL_PAIRS), max_rows=6))


@pytest.fixture(scope="module")
def whole(model, tok, prompts, tmp_path_factory):
    """An uninterrupted one-process run over `prompts` with SETTINGS: (folder, merged records)."""
    folder = tmp_path_factory.mktemp("whole")
    return folder, run(model, tok, prompts, folder)


def run(model, tok, prompts, folder, settings=SETTINGS):
    """One process generates everything into folder; the merged records."""
    generate_samples(TransformersBackend(model, tok), tok, prompts, settings, folder)
    return merge_shards(folder, prompts, settings.seeds)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- prompts


def test_read_prompts_ids_dedupe_and_order(tmp_path):
    """Strings or message lists; a trailing assistant turn (a `chosen` column) is dropped; the
    id of a single user turn is sha256 of its text (UltraFeedback's convention, as in the tiny
    data), so a string and the same turn as a list share it; duplicates keep the first, in file
    order."""
    strings = write_jsonl(tmp_path / "s.jsonl", [{"p": "b"}, {"p": "a"}, {"p": "b"}])
    got = read_prompts(DataSource(path=str(strings)), column="p")
    assert [p.messages for p in got] == [
        [{"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}],
    ]
    assert [p.prompt_id for p in got] == [hashlib.sha256(t).hexdigest() for t in (b"b", b"a")]
    assert [p.where[-15:] for p in got] == ["s.jsonl: line 1", "s.jsonl: line 2"]
    system = [{"role": "system", "content": "s"}, {"role": "user", "content": "c"}]
    rows = [
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]},
        {"chosen": system},
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "y"}]},
    ]
    lists = read_prompts(DataSource(path=str(write_jsonl(tmp_path / "m.jsonl", rows))), "chosen")
    assert [p.messages for p in lists] == [[{"role": "user", "content": "a"}], system]
    assert lists[0].prompt_id == got[1].prompt_id
    shipped = json.loads(EVAL_PAIRS.read_text().splitlines()[0])
    first = read_prompts(DataSource(path=str(EVAL_PAIRS), max_rows=1))[0]
    assert first.prompt_id == shipped["prompt_id"]


def test_read_prompts_uses_the_id_column_and_rejects_clashes(tmp_path):
    rows = [{"prompt_id": "p1", "prompt": "a"}, {"prompt_id": "p1", "prompt": "a"}]
    got = read_prompts(DataSource(path=str(write_jsonl(tmp_path / "p.jsonl", rows))))
    assert [(p.prompt_id, p.messages[0]["content"]) for p in got] == [("p1", "a")]
    rows.append({"prompt_id": "p1", "prompt": "other"})
    with pytest.raises(DataError, match=r"p\.jsonl: line 3: prompt_id p1 is also line 1"):
        read_prompts(DataSource(path=str(write_jsonl(tmp_path / "p.jsonl", rows))))


def test_read_prompts_missing_column_names_file_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a"}])
    with pytest.raises(DataError) as err:
        read_prompts(DataSource(path=str(path)), column="prompt", role="generate.prompts")
    (line,) = err.value.messages
    assert "generate.prompts" in line and "p.jsonl" in line and "no column 'prompt'" in line
    assert "found question" in line and "\n" not in line


# --------------------------------------------------------------------------- rendering


def test_one_bos_when_the_template_writes_it(tok):
    """The shipped template writes <|begin_of_text|> and the tokenizer adds one too: naive
    tokenization gives BOS, BOS; the rendered prompt has exactly one and ends with the
    assistant header."""
    prompt = Prompt("p", [{"role": "user", "content": "Sort: 3 1 2"}], "here")
    text = tok.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    assert tok(text)["input_ids"][:2] == [BOS, BOS]  # what decode.py fed vLLM
    ids = render_prompt_ids(tok, prompt)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert tok.decode(ids[-5:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_double_bos_is_an_error_and_a_missing_one_is_added(fresh_tok):
    prompt = Prompt("p7", [{"role": "user", "content": "hi"}], "prompts.jsonl: line 7")
    template = fresh_tok.chat_template
    fresh_tok.chat_template = "{{ bos_token }}" + template
    with pytest.raises(DataError, match=r"prompts.jsonl: line 7: prompt p7 renders with two BOS"):
        render_prompt_ids(fresh_tok, prompt)
    fresh_tok.chat_template = template.removeprefix("{{ bos_token }}")
    ids = render_prompt_ids(fresh_tok, prompt)
    assert ids[0] == BOS and ids.count(BOS) == 1


def test_stop_ids_join_tokenizer_and_generation_config(tok):
    config = types.SimpleNamespace(eos_token_id=[9, EOT])
    assert stop_token_ids(tok, config) == [EOT, 9]
    assert stop_token_ids(tok) == [EOT]


def test_seeds_settings():
    assert resolve_seeds([13, 21], None) == (13, 21)
    assert resolve_seeds(None, 3, seed=5) == (5, 6, 7)
    with pytest.raises(UserError, match="set exactly one"):
        resolve_seeds([1], 2)
    with pytest.raises(UserError, match="repeats a seed"):
        SamplingSettings(seeds=(13, 13))


# --------------------------------------------------------------------------- sampling


def test_sampling_is_deterministic_per_seed_whatever_the_order(
    model, tok, prompts, whole, tmp_path
):
    """A sample depends on (prompt, seed) only: the same prompts reversed, or a subset, give the
    same samples; other seeds or other prompts give other samples."""
    first = whole[1]
    again = run(model, tok, prompts[::-1][:3], tmp_path / "b")
    assert {r["prompt_id"]: r for r in again} == {r["prompt_id"]: r for r in first[-3:]}
    texts = [[s["text"] for s in r["samples"]] for r in first]
    assert all(a != b for a, b in texts)  # seeds differ
    assert len({a for a, _ in texts}) == len(texts)  # prompts do not share one random stream
    for record in first:
        assert [s["seed"] for s in record["samples"]] == [13, 21]
        assert all(s["finish_reason"] == "length" and s["tokens"] == 8 for s in record["samples"])


def test_finish_reason_stop_and_greedy(model, tok, prompts, tmp_path):
    """Every id a stop id: the first token ends the sample ("stop", 1 token). Temperature 0 is
    greedy: both seeds give the same text."""
    vocab = tuple(range(model.config.vocab_size))
    records = run(
        model, tok, prompts[:2], tmp_path / "a", SamplingSettings((1, 2), 1.0, 1.0, 8, vocab)
    )
    assert all(
        s["finish_reason"] == "stop" and s["tokens"] == 1 for r in records for s in r["samples"]
    )
    greedy = run(
        model, tok, prompts[:2], tmp_path / "b", SamplingSettings((1, 2), 0.0, 1.0, 8, (EOT,))
    )
    assert all(r["samples"][0]["text"] == r["samples"][1]["text"] for r in greedy)


def test_greedy_equals_transformers_generate(model, tok, prompts):
    """Temperature 0 through our KV-cache loop gives the tokens of transformers' own greedy
    generate (an independent implementation), for every prompt."""
    import torch

    from simpo_cli.onpolicy.sampling import Request, render_prompt_ids

    settings = SamplingSettings((0,), 0.0, 1.0, 10, (EOT,))
    backend = TransformersBackend(model, tok)
    for prompt in prompts[:3]:
        ids = render_prompt_ids(tok, prompt)
        (sample,) = backend.generate([Request(prompt.prompt_id, ids, 0)], settings)
        inputs = torch.tensor([ids])
        out = model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
            max_new_tokens=10, eos_token_id=[EOT], pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        new = out[0, len(ids) :].tolist()
        assert sample.text == tok.decode(new, skip_special_tokens=True)
        assert sample.tokens == len(new)


def test_top_p_keeps_the_smallest_set_reaching_it():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 draws tokens 0 and 1 only, about 5:3;
    top_p 0.81 adds token 2; top_p 1 draws all four."""
    import math

    import torch

    from simpo_cli.onpolicy.sampling import pick_token

    logits = torch.tensor([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])
    generator = torch.Generator().manual_seed(0)

    def draws(top_p: float) -> list[int]:
        settings = SamplingSettings((0,), temperature=1.0, top_p=top_p)
        return [pick_token(logits, settings, generator) for _ in range(4000)]

    nucleus = draws(0.8)
    assert set(nucleus) == {0, 1}
    assert nucleus.count(0) / len(nucleus) == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(draws(0.81)) == {0, 1, 2}
    assert set(draws(1.0)) == {0, 1, 2, 3}


# --------------------------------------------------------------------------- shards and resume


def test_split_prompts_covers_every_prompt_once():
    items = [Prompt(str(i), [], "") for i in range(7)]
    shares = [split_prompts(items, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 2, 2]
    assert [p for s in shares for p in s] == items


def test_merge_reports_missing_twice_and_wrong_seeds(model, tok, prompts, tmp_path):
    generate_samples(TransformersBackend(model, tok), tok, prompts[:3], SETTINGS, tmp_path)
    with pytest.raises(DataError, match=r"missing: 3 \(") as err:
        merge_shards(tmp_path, prompts, SETTINGS.seeds)
    assert "\n" not in str(err.value)
    lines = shard_path(tmp_path, 0).read_text().splitlines()
    shard_path(tmp_path, 1).write_text(lines[1] + "\n")  # a prompt in two shards
    with pytest.raises(DataError, match=r"twice: 1 \(.*samples-rank1.jsonl: line 1"):
        merge_shards(tmp_path, prompts[:3], SETTINGS.seeds)
    shard_path(tmp_path, 1).unlink()
    with pytest.raises(DataError, match=r"not sampled with seeds \[13, 42\]: 3"):
        merge_shards(tmp_path, prompts[:3], (13, 42))


def test_torn_last_line_is_regenerated(model, tok, prompts, whole, tmp_path):
    """A kill -9 mid-write leaves a line without its newline: the re-run cuts it, generates that
    prompt again and ends with the dataset of an uninterrupted run, byte for byte."""
    generate_samples(TransformersBackend(model, tok), tok, prompts[:2], SETTINGS, tmp_path)
    shard = shard_path(tmp_path, 0)
    shard.write_text(shard.read_text() + json.dumps(whole[1][2])[:40])
    assert run(model, tok, prompts, tmp_path) == whole[1]
    assert shard.read_text() == shard_path(whole[0], 0).read_text()


def test_resume_with_other_settings_is_refused(model, tok, prompts, tmp_path):
    run(model, tok, prompts[:1], tmp_path)
    other = SamplingSettings(
        seeds=(13, 21), temperature=0.5, max_new_tokens=8, stop_token_ids=(EOT,)
    )
    with pytest.raises(
        UserError, match=r"samples-rank0.jsonl: line 1: samples from other settings"
    ):
        run(model, tok, prompts, tmp_path, other)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    """The tiny model saved, so subprocesses load it without importing the trainer (seconds)."""
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    return folder


SCRIPT = """
import sys, time
from pathlib import Path
from transformers import AutoModelForCausalLM
from simpo_cli.data import load_tokenizer
from simpo_cli.onpolicy.sampling import (
    SamplingSettings, TransformersBackend, generate_samples, read_prompts
)
from simpo_cli.recipe import RECIPES_DIR, DataSource, ModelSettings

model_dir, folder, rank, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pause = float(sys.argv[5])
tok = load_tokenizer(ModelSettings(name_or_path=str(RECIPES_DIR / "tiny" / "tokenizer")))
data = RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl"
prompts = read_prompts(DataSource(path=str(data), max_rows=6))
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
backend = TransformersBackend(model, tok)
draw = backend.generate
def slow(requests, settings):
    time.sleep(pause)  # time for the test to kill this process between prompts
    return draw(requests, settings)
backend.generate = slow
settings = SamplingSettings(seeds=(13, 21), max_new_tokens=8, stop_token_ids=(4,))
generate_samples(backend, tok, prompts, settings, folder, rank, world)
"""


def start(
    model_dir: Path, folder: Path, rank: int = 0, world: int = 1, pause: float = 0.0
) -> subprocess.Popen:
    """SCRIPT in a fresh interpreter: generate_samples over the 6 prompts with SETTINGS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [sys.executable, "-c", SCRIPT, str(model_dir), str(folder), str(rank), str(world)]
    return subprocess.Popen(args + [str(pause)], env=env, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_equals_an_uninterrupted_run(
    model, model_dir, tok, prompts, whole, tmp_path
):
    """A generation process killed (SIGKILL) after 2 of 6 prompts; the same call again samples
    only the prompts the killed one had not written, and finishes the dataset, equal to an
    uninterrupted run."""
    folder = tmp_path / "killed"
    process = start(model_dir, folder, pause=0.4)
    shard, deadline = shard_path(folder, 0), time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 3:  # header + 2 prompts
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    lines = shard.read_text().split("\n")[1:-1]  # complete records, after the header
    assert 2 <= len(lines) < len(prompts), process.stderr.read()[-2000:]
    done = {json.loads(line)["prompt_id"] for line in lines}

    backend, asked = counting(TransformersBackend(model, tok))
    generate_samples(backend, tok, prompts, SETTINGS, folder)
    # The rerun's work: the other prompts, once per seed; sampling every prompt again would
    # give the same dataset (sampling is seeded per prompt), so only this count tells.
    rest = [p.prompt_id for p in prompts if p.prompt_id not in done]
    assert asked == [prompt_id for prompt_id in rest for _ in SETTINGS.seeds]
    assert merge_shards(folder, prompts, SETTINGS.seeds) == whole[1]


def counting(backend):
    """`backend` with its generate recording the prompt id of every request it is given."""
    asked: list[str] = []
    draw = backend.generate

    def generate(requests, settings):
        asked.extend(request.prompt_id for request in requests)
        return draw(requests, settings)

    backend.generate = generate
    return backend, asked


def test_two_processes_lose_and_duplicate_no_prompt(model_dir, prompts, whole, tmp_path):
    """Two processes at once (rank 0 and 1 of 2) on one folder: each writes its own shard; the
    merge has every prompt once, equal to a one-process run."""
    processes = [start(model_dir, tmp_path, rank, 2) for rank in range(2)]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    shares = [shard_path(tmp_path, r).read_text().count("\n") - 1 for r in range(2)]
    assert shares == [3, 3]
    assert merge_shards(tmp_path, prompts, SETTINGS.seeds) == whole[1]


# --------------------------------------------------------------------------- vLLM boundary


class FakeVLLM(types.ModuleType):
    """A stand-in `vllm` module that records what the backend passes and answers like vLLM:
    outputs[i].outputs[0] with text, token_ids, finish_reason."""

    def __init__(self):
        super().__init__("vllm")
        self.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        self.engines: list[dict] = []
        self.calls: list[tuple[list, list]] = []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)

            def generate(self, prompts, sampling_params, use_tqdm=True):
                if not isinstance(sampling_params, list):  # one SamplingParams for all
                    sampling_params = [sampling_params] * len(prompts)
                fake.calls.append((prompts, sampling_params))
                return [
                    fake.answer(i, p["prompt_token_ids"], getattr(s, "seed", None))
                    for i, (p, s) in enumerate(zip(prompts, sampling_params, strict=True))
                ]

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        self.LLM, self.SamplingParams = LLM, SamplingParams

    @staticmethod
    def answer(i: int, prompt_ids: list[int], seed: int | None) -> types.SimpleNamespace:
        """Request i's output: text naming its prompt length and seed, i + 1 tokens, finish
        reasons alternating length, stop."""
        completion = types.SimpleNamespace(
            text=f"reply {len(prompt_ids)} {seed}",
            token_ids=[7] * (i + 1),
            finish_reason="stop" if i % 2 else "length",
        )
        return types.SimpleNamespace(prompt_token_ids=prompt_ids, outputs=[completion])


def test_vllm_backend_passes_token_ids_and_per_request_seeds(tok, prompts, tmp_path, monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto") == "vllm"
    settings = SamplingSettings(seeds=(13, 21, 42), max_new_tokens=8, stop_token_ids=(EOT, 9))
    backend = VLLMBackend("some/model", max_model_len=64, tensor_parallel_size=2, chunk_size=4)
    assert fake.engines == [
        {
            "model": "some/model",
            "tokenizer": "some/model",
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.9,
            "dtype": "auto",
            "seed": 0,
            "max_model_len": 64,
        }
    ]
    generate_samples(backend, tok, prompts, settings, tmp_path)
    records = merge_shards(tmp_path, prompts, settings.seeds)

    assert [len(c[0]) for c in fake.calls] == [12, 6]  # chunks of 4 prompts x 3 seeds
    sent = [p for prompts_sent, _ in fake.calls for p in prompts_sent]
    params = [s for _, params_sent in fake.calls for s in params_sent]
    expected = [(p, seed) for p in prompts for seed in settings.seeds]
    for request, sampling, (prompt, seed) in zip(sent, params, expected, strict=True):
        assert request == {"prompt_token_ids": render_prompt_ids(tok, prompt)}  # ids, not text
        assert request["prompt_token_ids"][:2] == [BOS, 2]  # one BOS
        assert sampling.__dict__ == {
            "n": 1,
            "seed": request_seed(seed, prompt.prompt_id),
            "temperature": 0.8,
            "top_p": 0.95,
            "max_tokens": 8,
            "stop_token_ids": [EOT, 9],
            "skip_special_tokens": True,
        }
    first = records[0]["samples"]
    n_ids = len(render_prompt_ids(tok, prompts[0]))
    assert first[1] == {
        "seed": 21,
        "text": f"reply {n_ids} {request_seed(21, prompts[0].prompt_id)}",
        "finish_reason": "stop",
        "tokens": 2,
    }
    assert [s["finish_reason"] for s in first] == ["length", "stop", "length"]


def test_vllm_unavailable_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert resolve_backend("auto") == "transformers"
    with pytest.raises(
        UserError, match=r"backend: vllm: not installed; pip install 'simpo-cli\[vllm\]'"
    ):
        resolve_backend("vllm")
    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="backend: vllm: needs a CUDA GPU and none is visible"):
        VLLMBackend("some/model", max_model_len=64)
    assert resolve_backend("auto") == "transformers"
    assert generation._vllm_problem()
