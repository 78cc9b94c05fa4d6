"""Reward scorers: a reward model or a Python function gives each (prompt, response) a number.

Used by the annotate stage (scores for on-policy preference pairs, see binarize.py) and by the
evaluate stage. Both read sample records in the shape the generate stage writes, one per prompt:

    {"prompt_id": str,                          # stable key (never a list index: SimPO issue 62)
     "prompt": [{"role": ..., "content": ...}],  # the prompt turns, as plain messages
     "samples": [{"text": str,                   # the decoded reply (special tokens skipped)
                  "finish_reason": "stop" | "length",
                  "tokens": int,                 # reply tokens, in the policy's tokenizer
                  "seed": int | None}, ...]}

Two kinds of scorer, one interface (`Scorer`): called with a batch of `ScoreItem`s, they return
one float each.

- `RewardModelScorer`: a sequence-classification model with a scalar head (num_labels == 1:
  Skywork-Reward, most RMs), or a remote-code model whose output has `.score` (ArmoRM), loaded
  only when trust_remote_code is set. Each conversation is rendered with the REWARD model's own
  tokenizer and chat template (never the policy's rendered string: the two templates differ),
  with exactly one BOS.
- `FunctionScorer`: a Python function (prompt messages, response text) -> number, named
  "path/to/file.py:name" or "package.module:name": verifiable rewards such as a checked math
  answer, passing unit tests or a format rule.

Distribution is left to the stage: each process scores `split_for_rank(records, rank, world)`
and the main process merges the scores by prompt_id.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from simpo_cli.errors import UserError

Message = dict[str, Any]
RewardFunction = Callable[[list[Message], str], Any]


@dataclass(frozen=True)
class ScoreItem:
    """One (prompt, response) to score; prompt_id names it in error messages."""

    prompt_id: str
    prompt: list[Message]
    response: str


class Scorer(Protocol):
    """Scores a batch of items, one float each, in order."""

    batch_size: int

    def __call__(self, items: Sequence[ScoreItem]) -> list[float]: ...


# --------------------------------------------------------------------------- reward functions


def load_reward_function(spec: str, key: str = "reward_function") -> RewardFunction:
    """The callable named by `spec`: "path/to/file.py:name" (a file, imported by path) or
    "package.module:name" (an importable module). `key` names the setting in the one-line errors
    (a missing file, a module that does not import, no such name, not callable)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserError(
            f"{key}: '{spec}' is not a function reference; write 'path/to/file.py:name' or "
            "'package.module:name'"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise UserError(f"{key}: no file {path}; give the path of a Python file before ':'")
        # A unique module name per file; registered in sys.modules so that the file may use
        # dataclasses, pickling and relative lookups like any imported module.
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        module_name = f"simpo_reward_{digest}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"{key}: cannot import {path} as a Python file; use a .py file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise UserError(f"{key}: importing {path} failed: {_first_line(err)}") from None
        where = str(path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise UserError(
                f"{key}: cannot import module '{target}': {_first_line(err)}; install it or give "
                "'path/to/file.py:name'"
            ) from None
        where = f"module '{target}'"
    function = getattr(module, name, None)
    if function is None:
        raise UserError(f"{key}: {where} has no '{name}'; check the name after ':'")
    if not callable(function):
        raise UserError(
            f"{key}: '{name}' in {where} is a {type(function).__name__}, not a function; name a "
            "function (prompt messages, response text) -> float"
        )
    return function


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def as_score(value: Any, where: str) -> float:
    """A reward function's return value as a finite float. Real numbers (int, float, numpy
    scalars) are scores; so are True/False (1.0/0.0: a format rule that passes or not). Anything
    else, NaN or infinity raises a one-line UserError naming `where`."""
    if isinstance(value, numbers.Real):
        score = float(value)
        if math.isfinite(score):
            return score
        raise UserError(f"{where}: returned {score}; return a finite number")
    try:  # a 0-d tensor or array: .item() gives its Python number
        item = value.item() if hasattr(value, "item") else None
    except (TypeError, ValueError, RuntimeError):  # more than one element
        item = None
    if isinstance(item, numbers.Real):
        return as_score(item, where)
    raise UserError(
        f"{where}: returned {type(value).__name__} {value!r:.40}; return a number (float)"
    )


class FunctionScorer:
    """Scores with a Python function (prompt messages, response text) -> number, one call per
    item. An exception or a bad return value raises a one-line UserError naming the prompt id."""

    def __init__(
        self, function: RewardFunction, name: str = "reward_function", batch_size: int = 64
    ):
        self.function = function
        self.name = name
        self.batch_size = batch_size

    @classmethod
    def from_spec(cls, spec: str, key: str = "reward_function") -> FunctionScorer:
        return cls(load_reward_function(spec, key), name=spec)

    def __call__(self, items: Sequence[ScoreItem]) -> list[float]:
        scores = []
        for item in items:
            where = f"{self.name} on prompt {item.prompt_id}"
            try:
                # A copy of the messages: a function that edits them must not change the data.
                value = self.function([dict(m) for m in item.prompt], item.response)
            except Exception as err:
                raise UserError(f"{where}: raised {_first_line(err)}; fix the function") from None
            scores.append(as_score(value, where))
        return scores


# --------------------------------------------------------------------------- reward models


def _config_dict(path: str, key: str) -> dict[str, Any]:
    """The model's config.json as a plain dict, read without running any code from it."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except Exception as err:
        raise UserError(
            f"{key}: cannot read a model config from '{path}': {_first_line(err)}; give a local "
            "reward model folder or a reachable hub name"
        ) from None
    return config


class RewardModelScorer:
    """Scores with a sequence-classification reward model.

    Loading: AutoTokenizer and AutoModelForSequenceClassification from `path` (a folder or a hub
    name). A config naming remote code (`auto_map`) is refused unless trust_remote_code is set:
    without it transformers would silently build its own class for the model_type and drop the
    custom head (ArmoRM's gating layer). Without remote code the head must be scalar
    (num_labels == 1), checked before scoring; a remote-code model is checked on its first
    batch (its output has `.score`, or logits of width 1).

    The model's config needs pad_token_id to find each row's last token in a padded batch
    (LlamaForSequenceClassification refuses batches > 1 without it): when missing, it is set from
    the tokenizer's pad token (its EOS if it has none). Padding is on the right; the score is read
    at the last non-pad token, so a row scores the same alone or in a batch (when the pad id is
    the EOS, that is the token before a trailing EOS, alone and batched alike).

    dtype: "float32", "bfloat16" or "float16"; None picks bfloat16 on a GPU, float32 on CPU.
    max_length: None keeps every token; otherwise longer inputs keep their BOS and their last
    max_length - 1 tokens (the head reads the last token, the end of the reply) and are counted
    in `self.cut`.
    """

    def __init__(
        self,
        path: str,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | None = None,
        key: str = "reward_model",
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from simpo_cli.distributed import whole_weights

        self.path, self.key, self.batch_size, self.max_length = path, key, batch_size, max_length
        self.cut = 0
        config = _config_dict(path, key)
        self.remote = bool(config.get("auto_map"))
        if self.remote and not trust_remote_code:
            raise UserError(
                f"{key}: '{path}' needs its own model code (auto_map in its config.json); set "
                "trust_remote_code: true for the reward model if you trust that repository"
            )
        labels = config.get("num_labels") or _labels(config)
        if not self.remote and labels != 1:
            raise UserError(
                f"{key}: '{path}' has no scalar head (num_labels is {labels}, need 1); use a "
                "reward model that outputs one score per conversation"
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
            with whole_weights():  # a whole copy per process, even after a ZeRO-3 stage
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
                )
        except OSError as err:
            raise UserError(f"{key}: cannot load '{path}': {_first_line(err)}") from None
        if not self.tokenizer.chat_template:
            raise UserError(
                f"{key}: the tokenizer at '{path}' has no chat template; a reward model is scored "
                "on its own template, so use a model that ships one"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()

    def render(self, item: ScoreItem) -> list[int]:
        """Token ids of the prompt turns plus the reply, in the reward model's chat template, with
        exactly one BOS: the template's, else the tokenizer's when it adds one."""
        tokenizer = self.tokenizer
        messages = [*item.prompt, {"role": "assistant", "content": item.response}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None:
            # Llama-3 and gemma templates write the BOS; tokenizing with special tokens would add
            # a second one (a double BOS shifts scores). Templates that do not write it rely on
            # the tokenizer adding it.
            while ids[:2] == [bos, bos]:
                ids = ids[1:]
            if ids[:1] != [bos] and tokenizer("x")["input_ids"][:1] == [bos]:
                ids = [bos] + ids
        if self.max_length is not None and len(ids) > self.max_length:
            self.cut += 1
            keep_bos = int(bos is not None and ids[:1] == [bos])
            ids = ids[:keep_bos] + ids[len(ids) - (self.max_length - keep_bos) :]
        return ids

    def __call__(self, items: Sequence[ScoreItem]) -> list[float]:
        """Scores of one batch; rows are right-padded with the pad id, masked out."""
        import torch

        rows = [self.render(item) for item in items]
        width = max(len(r) for r in rows)
        pad = self.model.config.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask.to(self.device))
        score = getattr(out, "score", None)
        values = (score if score is not None else out.logits).float().reshape(len(rows), -1)
        if values.shape[1] != 1:
            raise UserError(
                f"{self.key}: '{self.path}' has no scalar head (it outputs {values.shape[1]} "
                "numbers per conversation and no .score); use a reward model with one score"
            )
        return values[:, 0].tolist()


def _labels(config: dict[str, Any]) -> int:
    """num_labels as transformers derives it when config.json only has id2label (default 2)."""
    return len(config.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})


# --------------------------------------------------------------------------- scoring records


def score_records(
    records: Sequence[dict[str, Any]],
    scorer: Scorer,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> list[list[float]]:
    """Scores of every sample of every record (scores[i][j]: record i, sample j).

    Items are scored longest reply first, in batches of scorer.batch_size: batches of similar
    length waste little padding, and a batch too large for memory fails at the start."""
    from tqdm.auto import tqdm

    items = [
        (i, j, ScoreItem(record["prompt_id"], record["prompt"], sample["text"]))
        for i, record in enumerate(records)
        for j, sample in enumerate(record["samples"])
    ]
    items.sort(key=lambda entry: -len(entry[2].response))
    scores: list[list[float]] = [[math.nan] * len(r["samples"]) for r in records]
    # disable=None: no bar when stderr is not a terminal (logs, tests), as for generation.
    disable = None if progress else True
    with tqdm(total=len(items), desc="Scoring", unit="sample", disable=disable) as bar:
        for start in range(0, len(items), scorer.batch_size):
            batch = items[start : start + scorer.batch_size]
            for (i, j, _), score in zip(batch, scorer([item for _, _, item in batch]), strict=True):
                scores[i][j] = score
            bar.update(len(batch))
            if should_stop is not None and should_stop():
                break  # the caller stops; unscored samples keep NaN
    return scores


def split_for_rank(records: Sequence[Any], rank: int, world: int) -> list[Any]:
    """This process's share of the records: contiguous slices of ceil(n / world), in order, so the
    shares cover every record exactly once (no remainder dropped) whatever n and world are."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    size = -(-len(records) // world)
    return list(records[rank * size : (rank + 1) * size])
