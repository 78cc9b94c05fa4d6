"""Generation: sampling a policy's replies to prompts, resumably, on vLLM or transformers.

Used by the `generate` stage (on-policy preference data) and by evaluation. The flow:

    prompts = read_prompts(source)                      # deduplicated, keyed by prompt_id
    backend = make_backend(resolve_backend("auto"), ...)
    generate_samples(backend, tokenizer, prompts, settings, folder, rank, world_size)
    records = merge_shards(folder, prompts, settings.seeds)   # checked: all samples, none twice

Guarantees, and why:
- Every sample depends on its prompt and seeds only: each request is drawn from its own
  generator, seeded with `request_seed(seed, prompt_id)` (vLLM's per-request
  `SamplingParams(seed=)`; on transformers a torch.Generator per row of a batch holding one
  prompt's seeds). So an interrupted run, a resumed run and a run split over processes give the
  same samples (bit-exact on transformers on one machine; on vLLM batch composition matters too
  unless VLLM_BATCH_INVARIANT=1: see its reproducibility docs).
  One request per seed, never `n>1`: vLLM gives child i of `n` the seed `seed + i`, which is not
  the authors' seed set (13, 21, 42, 79, 100).
- Prompts reach the model as token ids rendered here with exactly one BOS (`render_prompt_ids`);
  a template that writes two is an error, never silently fixed (a double BOS costs points).
- Results are appended to `samples-rank{r}.jsonl` one line per prompt (all its samples), flushed
  and fsynced; a re-run skips prompt ids done in any shard of the folder and drops a torn last
  line left by a kill -9, so the same command resumes to the same dataset.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from simpo_cli.data import (
    LOCATION_COLUMN,
    Message,
    adds_bos,
    as_messages,
    load_source,
    row_location,
)
from simpo_cli.errors import DataError, UserError
from simpo_cli.recipe import DataSource, seeds_problem

SHARD_PATTERN = "samples-rank*.jsonl"
FinishReason = Literal["stop", "length"]


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt to sample replies for: its id, its turns, and its place in the source."""

    prompt_id: str
    messages: list[Message]
    where: str  # "prompts.jsonl: line 3", for error messages


def prompt_hash(messages: list[Message]) -> str:
    """A stable id for a prompt without one: sha256 of the user text when the prompt is a single
    user turn (UltraFeedback's prompt_id convention, so ids match the published datasets), else
    of the messages as canonical JSON."""
    if (
        len(messages) == 1
        and messages[0]["role"] == "user"
        and isinstance(messages[0]["content"], str)
    ):
        text = messages[0]["content"]
    else:
        text = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_prompts(
    source: DataSource,
    column: str = "prompt",
    role: str = "generate.prompts",
    id_column: str = "prompt_id",
) -> list[Prompt]:
    """The prompts of a data source, deduplicated by prompt_id, in source order (first kept).

    Each row's `column` holds a string (one user turn) or a message list. A list ending in
    assistant turns (e.g. the `chosen` column of a preference dataset) loses those turns: they
    are the replies being replaced. `id_column`, when the source has it, gives the ids; else
    `prompt_hash`. Two rows with the same id but different prompts are an error (a merge keyed by
    id would pair samples with the wrong prompt). Raises DataError naming the file and row.
    """
    dataset = load_source(source, role)
    columns = [c for c in dataset.column_names if c != LOCATION_COLUMN]
    if column not in columns:
        raise DataError(
            f"{role}: {source.path} has no column '{column}' (found {', '.join(columns)}); "
            "set the prompts column to the one holding prompt strings or message lists"
        )
    has_ids = id_column in columns
    prompts: dict[str, Prompt] = {}
    for index, row in enumerate(dataset):
        where = f"{role}: {source.path}: {row_location(row, index)}"
        messages = as_messages(row[column], "user", f"{where}: '{column}'")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: '{column}' holds no prompt turns (only assistant replies)")
        if has_ids:
            if row[id_column] is None or str(row[id_column]).strip() == "":
                raise DataError(f"{where}: '{id_column}' is empty; give every row an id")
            prompt_id = str(row[id_column])
        else:
            prompt_id = prompt_hash(messages)
        first = prompts.get(prompt_id)
        if first is None:
            prompts[prompt_id] = Prompt(prompt_id, messages, where)
        elif first.messages != messages:
            raise DataError(
                f"{where}: prompt_id {prompt_id} is also {first.where.split(': ')[-1]} with a "
                f"different prompt; give each prompt its own id"
            )
    if not prompts:
        raise DataError(f"{role}: {source.path} has no rows")
    return list(prompts.values())


def render_prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt as the model sees it: chat template with the generation prompt, tokenized
    without special tokens, with exactly one BOS (prepended when the template writes none but
    the tokenizer normally adds one). A template writing two BOS is a DataError: the model would
    see a double BOS, which silently costs quality."""
    text = tokenizer.apply_chat_template(
        prompt.messages, tokenize=False, add_generation_prompt=True
    )
    # add_special_tokens=False: the template writes the BOS (Llama-3, gemma-2); letting the
    # tokenizer add one too is the double-BOS bug of the SimPO authors' decode.py.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None:
        if ids[:2] == [bos, bos]:
            raise DataError(
                f"{prompt.where}: prompt {prompt.prompt_id} renders with two BOS tokens "
                f"({tokenizer.bos_token!r}); fix the chat template so it writes one BOS"
            )
        if ids[:1] != [bos] and adds_bos(tokenizer):
            ids = [bos] + ids
    return ids


def needed_model_len(tokenizer, prompts: Sequence[Prompt], max_new_tokens: int) -> int:
    """The context an engine needs for these prompts: the longest rendered prompt plus
    max_new_tokens (vLLM's max_model_len; its default, the model's whole context, can exceed the
    KV cache and fail at start-up, vllm #2418)."""
    return max((len(render_prompt_ids(tokenizer, p)) for p in prompts), default=0) + max_new_tokens


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus the model's generation_config EOS ids (Llama-3
    instruct models end a turn with <|eot_id|> but their tokenizer's EOS may be
    <|end_of_text|>, so both are needed)."""
    ids = [tokenizer.eos_token_id]
    if generation_config is not None:
        extra = getattr(generation_config, "eos_token_id", None)
        ids += extra if isinstance(extra, list) else [extra]
    return sorted({i for i in ids if i is not None})


def saved_generation_config(model: str):
    """The generation_config.json of a saved or hub model, or None when it has none (the
    tokenizer's EOS then ends replies alone)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model)
    except Exception:  # none saved, or a name the hub cannot resolve offline
        return None


# --------------------------------------------------------------------------- settings, records


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: one request per seed per prompt."""

    seeds: tuple[int, ...]
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 4096
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problem = seeds_problem(self.seeds)
        if problem:
            raise UserError(problem)


def resolve_seeds(seeds: Sequence[int] | None, num_samples: int | None, seed: int = 0):
    """The seeds to sample with: `seeds` as given, or `num_samples` consecutive seeds from
    `seed`. Exactly one of the two must be set."""
    if (seeds is None) == (num_samples is None):
        raise UserError("seeds / num_samples: set exactly one (e.g. seeds: [13, 21, 42, 79, 100])")
    if seeds is not None:
        return tuple(seeds)
    assert num_samples is not None
    return tuple(range(seed, seed + num_samples))


def request_seed(seed: int, prompt_id: str) -> int:
    """The seed of one request's generator, derived from the user's seed and the prompt id
    (below 2**63: vLLM and torch take it). Not `seed` itself: the authors' decode.py gave every
    prompt the same seed, so all prompts shared one random stream and their samples were
    correlated (with a weak model, near-identical)."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()
    return int(digest[:15], 16)


@dataclass(frozen=True)
class Request:
    """One sample to draw: a rendered prompt, the user's seed, and its generator's seed
    (`request_seed(seed, prompt_id)`)."""

    prompt_id: str
    prompt_ids: list[int]
    seed: int

    @property
    def generator_seed(self) -> int:
        return request_seed(self.seed, self.prompt_id)


@dataclass(frozen=True)
class Sample:
    """One drawn reply. tokens counts the generated tokens, the end-of-turn token included;
    finish_reason is "stop" (an end-of-turn id was produced) or "length" (max_new_tokens hit).
    text is decoded without special tokens."""

    seed: int
    text: str
    finish_reason: FinishReason
    tokens: int


class Backend(Protocol):
    """Draws samples: one per request, in request order."""

    name: str
    chunk_size: int  # prompts per call to `generate` (results are written after each call)

    def generate(self, requests: list[Request], settings: SamplingSettings) -> list[Sample]: ...


# --------------------------------------------------------------------------- backends


def resolve_backend(name: Literal["auto", "vllm", "transformers"], key: str = "backend") -> str:
    """ "vllm" or "transformers": auto takes vLLM when it is installed and a GPU is visible.
    Asking for vLLM without either is a UserError with the fix, naming the setting `key`."""
    if name == "transformers":
        return name
    problem = _vllm_problem()
    if name == "vllm" and problem:
        raise UserError(f"{key}: vllm: {problem}")
    return "transformers" if problem else "vllm"


def _vllm_problem() -> str:
    """Why vLLM cannot run here, or "" when it can."""
    try:
        installed = importlib.util.find_spec("vllm") is not None
    except ValueError:  # sys.modules["vllm"] is None (tests block the import this way)
        installed = False
    if not installed:
        return "not installed; pip install 'simpo-cli[vllm]', or set backend: transformers"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and none is visible; set backend: transformers on CPU"
    return ""


class TransformersBackend:
    """Sampling with a transformers model and its KV cache, for CPU, tests and small models.

    The samples of one prompt (one row per seed) are drawn together, as a batch of identical
    prompts: no padding, and each row draws its tokens from its own generator, seeded with
    `request_seed(seed, prompt_id)`. So a prompt's samples depend on the prompt and the seed list
    only, not on which other prompts are generated, in which order, or by which process.
    Temperature 0 is greedy. top_p keeps the smallest set of tokens whose probability reaches it
    (nucleus sampling, as vLLM); no top_k, no repetition penalty: a checkpoint's
    generation_config does not change what is sampled."""

    name = "transformers"
    chunk_size = 1

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def generate(self, requests: list[Request], settings: SamplingSettings) -> list[Sample]:
        samples: list[Sample] = []
        start = 0
        while start < len(requests):  # consecutive requests of one prompt form a batch
            end = start + 1
            while end < len(requests) and requests[end].prompt_id == requests[start].prompt_id:
                end += 1
            samples += self._sample(requests[start:end], settings)
            start = end
        return samples

    def _sample(self, group: list[Request], settings: SamplingSettings) -> list[Sample]:
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        rows = len(group)
        generators = [torch.Generator(device=device).manual_seed(r.generator_seed) for r in group]
        stop = set(settings.stop_token_ids)
        drawn: list[list[int]] = [[] for _ in group]
        finished = [False] * rows
        inputs = torch.tensor([group[0].prompt_ids] * rows, device=device)
        # transformers 5.x calls the KV cache `cache`; earlier versions `past_key_values`.
        cache_key = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )
        past = None
        with torch.inference_mode():
            for _ in range(settings.max_new_tokens):
                out = self.model(input_ids=inputs, use_cache=True, **{cache_key: past})
                past = out.get(cache_key)
                logits = out.logits[:, -1, :].float()
                picked = []
                for i in range(rows):
                    if finished[i]:  # fed a stand-in token; what the row computes is unused
                        picked.append(drawn[i][-1])
                        continue
                    token = pick_token(logits[i], settings, generators[i])
                    drawn[i].append(token)
                    finished[i] = token in stop
                    picked.append(token)
                if all(finished):
                    break
                inputs = torch.tensor(picked, device=device).unsqueeze(1)
        self.model.train(was_training)
        return [
            Sample(
                seed=request.seed,
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                finish_reason="stop" if tokens and tokens[-1] in stop else "length",
                tokens=len(tokens),
            )
            for request, tokens in zip(group, drawn, strict=True)
        ]


def pick_token(logits, settings: SamplingSettings, generator) -> int:
    """One token from a row of logits: the argmax at temperature 0, else a draw from the
    temperature-scaled distribution cut to its top_p nucleus (the most probable tokens whose
    probabilities, added in order, first reach top_p)."""
    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens above
        sorted_probs[before >= settings.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class VLLMBackend:
    """vLLM's offline engine on GPUs. Prompts go in as token ids, so vLLM never tokenizes text
    (and never adds a second BOS). One engine per process: for data parallel, launch one process
    per GPU (CUDA_VISIBLE_DEVICES) and split the prompts (rank, world_size); tensor_parallel_size
    > 1 spreads one engine over several GPUs for a model too big for one."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        max_model_len: int,  # needed_model_len(...)
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        seed: int = 0,
        chunk_size: int = 256,
    ) -> None:
        problem = _vllm_problem()
        if problem:
            raise UserError(f"backend: vllm: {problem}")
        from vllm import LLM

        self.chunk_size = chunk_size
        self.llm = LLM(
            model=model,
            tokenizer=tokenizer or model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
        )

    def generate(self, requests: list[Request], settings: SamplingSettings) -> list[Sample]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                seed=request.generator_seed,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_new_tokens,
                stop_token_ids=list(settings.stop_token_ids),
                skip_special_tokens=True,
            )
            for request in requests
        ]
        # A TokensPrompt is a dict with prompt_token_ids: no text, so no re-tokenization.
        prompts = [{"prompt_token_ids": list(request.prompt_ids)} for request in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = []
        for request, output in zip(requests, outputs, strict=True):
            completion = output.outputs[0]
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"vLLM finished prompt {request.prompt_id} seed {request.seed} with "
                    f"'{completion.finish_reason}'"
                )
            samples.append(
                Sample(
                    seed=request.seed,
                    text=completion.text,
                    finish_reason=completion.finish_reason,
                    tokens=len(completion.token_ids),
                )
            )
        return samples


# --------------------------------------------------------------------------- shards


def split_prompts(prompts: Sequence[Prompt], rank: int, world_size: int) -> list[Prompt]:
    """This process's share: contiguous blocks, the first len % world_size one prompt longer, so
    every prompt is in exactly one share (none dropped, unlike int(N / world) slicing)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    size, extra = divmod(len(prompts), world_size)
    start = rank * size + min(rank, extra)
    return list(prompts[start : start + size + (rank < extra)])


def shard_path(folder: Path, rank: int) -> Path:
    return folder / f"samples-rank{rank}.jsonl"


def _read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each complete line; a last line without its newline is a write
    cut short by a kill and is skipped (the prompt is generated again)."""
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: after the last newline
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {number}: damaged ({err.msg}); delete the file to regenerate "
                    "its prompts"
                ) from None


def _header(settings: SamplingSettings, model_name: str) -> dict[str, Any]:
    return {"generation": {"model": model_name, **asdict(settings)}}


def _check_header(path: Path, number: int, line: dict[str, Any], header: dict[str, Any]) -> None:
    # JSON turns tuples into lists: compare both as JSON.
    if json.loads(json.dumps(line)) != json.loads(json.dumps(header)):
        raise UserError(
            f"{path}: line {number}: samples from other settings ({line.get('generation')}; "
            f"now {header['generation']}); use a new output folder or delete this one"
        )


def _done_ids(folder: Path, header: dict[str, Any]) -> set[str]:
    """Prompt ids with a complete record in any shard of the folder (any world size)."""
    done: set[str] = set()
    for path in sorted(folder.glob(SHARD_PATTERN)):
        for number, line in _read_lines(path):
            if "generation" in line:
                _check_header(path, number, line, header)
            else:
                done.add(line["prompt_id"])
    return done


def _open_shard(path: Path, header: dict[str, Any]):
    """Open a shard for appending, first cutting a torn last line (so the next record does not
    glue onto it) and writing the settings header to a new file."""
    if path.exists():
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with path.open("r+b") as f:
                f.truncate(keep)
    f = path.open("a", encoding="utf-8")
    if f.tell() == 0:
        _append(f, header)
    return f


def _append(f, record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())  # on disk before the next prompt: a kill loses at most this line


def generate_samples(
    backend: Backend,
    tokenizer,
    prompts: Sequence[Prompt],
    settings: SamplingSettings,
    folder: Path,
    rank: int = 0,
    world_size: int = 1,
    model_name: str = "",
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Sample len(settings.seeds) replies for this process's share of the prompts into
    folder/samples-rank{rank}.jsonl, skipping prompts already done in any shard; returns the
    shard. Records: {"prompt_id", "prompt": messages, "samples": [Sample as dict, in seed
    order]}, the file's first line being the settings header (a re-run with other settings or
    another `model_name` is refused). Every prompt is rendered first, so a double BOS fails
    before any GPU time is spent. `should_stop`, checked after each chunk of prompts, ends the
    loop early (a stop signal): what is written stays and a re-run goes on from there."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    header = _header(settings, model_name)
    share = split_prompts(prompts, rank, world_size)
    rendered = {p.prompt_id: render_prompt_ids(tokenizer, p) for p in share}
    done = _done_ids(folder, header)
    todo = [p for p in share if p.prompt_id not in done]
    path = shard_path(folder, rank)
    with (
        _open_shard(path, header) as f,
        tqdm(
            total=len(share),
            initial=len(share) - len(todo),
            desc=f"Generating (rank {rank})",
            unit="prompt",
            disable=None,  # no bar when stderr is not a terminal (logs, tests)
        ) as bar,
    ):
        for start in range(0, len(todo), backend.chunk_size):
            chunk = todo[start : start + backend.chunk_size]
            requests = [
                Request(p.prompt_id, rendered[p.prompt_id], seed)
                for p in chunk
                for seed in settings.seeds
            ]
            samples = iter(backend.generate(requests, settings))
            for p in chunk:
                drawn = [asdict(next(samples)) for _ in settings.seeds]
                _append(f, {"prompt_id": p.prompt_id, "prompt": p.messages, "samples": drawn})
                bar.update(1)
            if should_stop is not None and should_stop():
                break
    return path


def merge_shards(
    folder: Path, prompts: Sequence[Prompt], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Every shard's records, in prompt order, checked: each prompt id has one record with one
    sample per seed; none missing, none twice, none unknown. Raises DataError listing what is
    wrong (up to 5 ids per kind) and how to fix it."""
    records: dict[str, dict[str, Any]] = {}
    twice: list[str] = []
    wrong: list[str] = []
    wanted = {p.prompt_id for p in prompts}
    for path in sorted(folder.glob(SHARD_PATTERN)):
        for number, line in _read_lines(path):
            if "generation" in line:
                continue
            prompt_id = line["prompt_id"]
            if prompt_id in records:
                twice.append(f"{prompt_id} ({path.name}: line {number})")
            elif [s["seed"] for s in line["samples"]] != list(seeds):
                wrong.append(f"{prompt_id} (seeds {[s['seed'] for s in line['samples']]})")
            records[prompt_id] = line
    missing = [p.prompt_id for p in prompts if p.prompt_id not in records]
    unknown = [i for i in records if i not in wanted]
    problems = [
        f"{what}: {len(ids)} ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
        for what, ids in (
            ("missing", missing),
            ("twice", twice),
            (f"not sampled with seeds {list(seeds)}", wrong),
            ("not among the prompts", unknown),
        )
        if ids
    ]
    if problems:
        raise DataError(
            f"{folder}: samples do not match the prompts: {'; '.join(problems)}; "
            "rerun generation to fill what is missing, or delete the folder to start over"
        )
    return [records[p.prompt_id] for p in prompts]
