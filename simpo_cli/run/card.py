"""The model card (README.md) of every model folder a training stage writes, built with
huggingface_hub's ModelCard: what a reader of the folder, or of its hub repository, needs.

Card data (the YAML header the hub indexes): base_model (a hub name only: the recipe's model,
or the previous stage's repository when that stage is pushed too), datasets (hub names only:
local files are named in the text, by file name), library_name (transformers; peft for an
adapter), tags (the loss, simpo-cli, alignment, ...), pipeline_tag. The text: the base model,
the data with their splits, the stage's hyperparameters as the recipe resolved them (gamma both
as gamma_beta_ratio and as gamma = beta x ratio), the pipeline and this stage's place in it, the
evaluate stage's table once it has scored the model, how to load it, and the SimPO citation.

Everything comes from the recipe as resolved_recipe.yaml holds it (redacted: redact.py), and
the written text is redacted once more: no secret of the environment reaches a card. Absolute
paths of this machine do not either: a local file or folder is named by its last part.

A stage folder gets its card before stage_complete.json (pipeline.py), on the main process; with
LoRA its adapter/ gets one of its own (replacing peft's placeholder card). The evaluate stage
puts its comparison table into the cards of the run's models it scored (add_evaluation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from simpo_cli.recipe import LOSS_DEFAULTS, Recipe
from simpo_cli.redact import redact, redact_text
from simpo_cli.run.instances import round_start

CARD = "README.md"
ADAPTER_DIR = "adapter"  # model/adapters.py: a LoRA stage's adapter folder
HUB = "https://huggingface.co"
EVALUATION_START = "<!-- simpo-cli:evaluation -->"
EVALUATION_END = "<!-- /simpo-cli:evaluation -->"

CITATION = """\
@inproceedings{meng2024simpo,
  title     = {{SimPO}: Simple Preference Optimization with a Reference-Free Reward},
  author    = {Meng, Yu and Xia, Mengzhou and Chen, Danqi},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024},
  url       = {https://arxiv.org/abs/2405.14734}
}"""

LOSS_NAMES = {
    "simpo": "SimPO", "dpo": "DPO", "ipo": "IPO", "rdpo": "R-DPO", "kto": "KTO", "cpo": "CPO",
    "orpo": "ORPO", "rrhf": "RRHF", "slic": "SLiC-HF",
}  # fmt: skip

SELECTIONS = {"best_vs_worst": "best against worst", "best_vs_random": "best against another"}

TEMPLATE = """\
---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Model

{{ model }}

## Training data

{{ data }}

## Training hyperparameters

{{ hyperparameters }}

## Pipeline

{{ pipeline }}

{{ evaluation_start }}
{{ evaluation }}
{{ evaluation_end }}

## How to use

{{ usage }}

## Citation

{{ citation_note }}

```bibtex
{{ citation }}
```
"""


def write_cards(recipe: Recipe, kind: str, folder: Path, model_from: str | None) -> list[Path]:
    """README.md in a training stage's folder and, with LoRA, in its adapter/; returns the
    cards written. `model_from`: the stage whose model this one started from (None: the
    recipe's model)."""
    card = _Card(recipe, kind, folder, model_from)
    written = [_save(card.stage_card(), folder / CARD)]
    if (folder / ADAPTER_DIR / "adapter_config.json").is_file():
        written.append(_save(card.adapter_card(), folder / ADAPTER_DIR / CARD))
    return written


def add_evaluation(folder: Path, table: str, label: str) -> None:
    """Put the evaluate stage's comparison table into the card of a model it scored (the row
    `label`), in place of what the card said of its evaluation before."""
    path = folder / CARD
    card = ModelCard.load(path)
    section = (
        "## Evaluation\n\n"
        f"Scored by this pipeline's `evaluate` stage, beside the other models it compared; this "
        f"model is the row `{label}`. The stage's folder (`evaluate/`) holds the answers, the "
        "same table as comparison.csv and .json, and its plots.\n\n" + table.strip()
    )
    start, end = card.text.find(EVALUATION_START), card.text.find(EVALUATION_END)
    if start < 0 or end < start:  # a card without the markers: the section goes at the end
        card.text = card.text.rstrip() + f"\n\n{EVALUATION_START}\n{section}\n{EVALUATION_END}\n"
    else:
        head, tail = card.text[: start + len(EVALUATION_START)], card.text[end:]
        card.text = f"{head}\n{section}\n{tail}"
    _save(card, path)


def _save(card: ModelCard, path: Path) -> Path:
    # A last pass over the whole text: a secret of the environment that reached a name or a
    # description is replaced there too (the card is parsed again, so its header stays valid).
    ModelCard(redact_text(str(card))).save(path)
    return path


class _Card:
    """The facts both cards of a stage folder are written from."""

    def __init__(self, recipe: Recipe, kind: str, folder: Path, model_from: str | None):
        self.recipe = recipe
        self.kind = kind
        # The stage's folder in its run: preference, or round-2/preference with rounds.
        in_round = re.fullmatch(r"round-\d+", folder.parent.name) is not None
        self.run = folder.parent.parent if in_round else folder.parent
        self.name = folder.relative_to(self.run).as_posix()
        self.folder = folder
        self.model_from = model_from
        # The recipe as resolved_recipe.yaml holds it: defaults filled, secrets redacted.
        self.settings = redact(recipe.dump())
        self.section = self.settings[kind]
        # Pushed stages by folder: with rounds, a stage they repeat is pushed from its last round.
        self.targets = {recipe.final_folder(s): t for s, t in recipe.hub_targets().items()}
        self.merged = (folder / "config.json").is_file()
        self.adapter = (folder / ADAPTER_DIR / "adapter_config.json").is_file()

    # ------------------------------------------------------------------ the two cards

    def stage_card(self) -> ModelCard:
        adapter_only = self.adapter and not self.merged
        base_name, base_text = self._stage_base(self.model_from)
        if adapter_only:
            files = (
                "This folder holds a LoRA adapter only (`adapter/`, peft), trained on the base "
                f"model below: load it on that base, as shown under How to use.\n\nBase model: "
                f"{self._adapter_base()[1]}."
            )
        else:
            files = (
                "The full model (safetensors weights, config, and the tokenizer with its chat "
                f"template).\n\nBase model: {base_text}."
            )
            if self.adapter:
                files += (
                    "\n\nTrained as a LoRA adapter, kept in `adapter/` (with its own card); the "
                    "model here has the adapter merged into its base."
                )
        data = ModelCardData(
            base_model=self._adapter_base()[0] if adapter_only else base_name,
            datasets=self._hub_datasets() or None,
            library_name="peft" if adapter_only else "transformers",
            pipeline_tag="text-generation",
            tags=self._tags(lora=self.adapter),
        )
        usage = self._adapter_usage(in_adapter=False) if adapter_only else self._usage()
        return self._render(data, self._title(), files, usage)

    def adapter_card(self) -> ModelCard:
        base_name, base_text = self._adapter_base()
        files = (
            "A LoRA adapter (peft) trained by this stage. It needs its base model, which it "
            f"does not hold: {base_text}."
        )
        if self.merged:
            files += " The folder above holds this stage's model: the adapter merged into it."
        data = ModelCardData(
            base_model=base_name,
            datasets=self._hub_datasets() or None,
            library_name="peft",
            pipeline_tag="text-generation",
            tags=self._tags(lora=True),
        )
        return self._render(
            data, f"{self._title()} (LoRA adapter)", files, self._adapter_usage(in_adapter=True)
        )

    def _render(self, data: ModelCardData, title: str, model: str, usage: str) -> ModelCard:
        return ModelCard.from_template(
            data,
            template_str=TEMPLATE,
            title=title,
            summary=self._summary(),
            model=model,
            data=self._data(),
            hyperparameters=self._hyperparameters(),
            pipeline=self._pipeline(),
            evaluation_start=EVALUATION_START,
            evaluation=self._evaluation_note(),
            evaluation_end=EVALUATION_END,
            usage=usage,
            citation_note=(
                "This model was trained with simpo-cli, a tool for SimPO (Simple Preference "
                "Optimization); if you use it, please cite the SimPO paper:"
            ),
            citation=CITATION,
        )

    # ------------------------------------------------------------------ what it is

    def _title(self) -> str:
        return f"{self.settings['name']}-{self.name.replace('/', '-')}"

    def _loss(self) -> str:
        return self.section.get("loss", "sft") if self.kind == "preference" else "sft"

    def _tags(self, lora: bool) -> list[str]:
        tags = [self._loss(), "simpo-cli", "alignment"]
        tags += ["preference-optimization"] if self.kind == "preference" else ["sft"]
        tags += ["lora", "peft"] if lora else []
        return list(dict.fromkeys(tags))

    def _summary(self) -> str:
        what = (
            f"{LOSS_NAMES[self._loss()]} preference optimisation"
            if self.kind == "preference"
            else "supervised fine-tuning (cross-entropy on the assistant turns)"
        )
        if self._loss() == "simpo":
            what += " ([Meng, Xia and Chen, NeurIPS 2024](https://arxiv.org/abs/2405.14734))"
        text = (
            f"A causal language model trained by {what}: the `{self.name}` stage of the "
            f"simpo-cli recipe `{self.settings['name']}`."
        )
        description = self.settings.get("description")
        return text + (f"\n\nThe recipe: {description}" if description else "")

    # ------------------------------------------------------------------ base models

    def _root(self) -> tuple[str | None, str]:
        """(hub name or None, text) of the recipe's model, the first training stage's start."""
        model = self.settings["model"]
        if model.get("init") == "from_config":
            config = model.get("config") or {}
            sizes = ", ".join(
                f"{label} {config[key]}"
                for key, label in (
                    ("num_hidden_layers", "layers"),
                    ("hidden_size", "hidden size"),
                    ("vocab_size", "vocabulary"),
                )  # fmt: skip
                if key in config
            )
            seed = self.recipe.first_stage_seed()
            return None, (
                f"a new `{config.get('model_type')}` model built from config, with random "
                f"weights (seed {seed}{'; ' + sizes if sizes else ''}): no pretrained base"
            )
        return _model_name(model.get("name_or_path"))

    def _stage_base(self, stage: str | None) -> tuple[str | None, str]:
        """(hub name or None, text) of the model a stage started from: the recipe's model, or
        the model of the stage before it (its repository when that one is pushed too)."""
        if stage is None:
            return self._root()
        earlier_name, earlier = self._stage_base(self._earlier(stage))
        if stage in self.targets:
            repo, revision = self.targets[stage]
            at = f" (revision `{revision}`)" if revision else ""
            return repo, (
                f"the model of this pipeline's `{stage}` stage, [`{repo}`]({HUB}/{repo}){at}, "
                f"itself trained from {earlier}"
            )
        return earlier_name, (
            f"the model of this pipeline's `{stage}` stage (the `{stage}` folder of this run), "
            f"itself trained from {earlier}"
        )

    def _adapter_base(self) -> tuple[str | None, str]:
        """(hub name or None, text) of the model this stage's adapter sits on."""
        return self._stage_base(self._adapter_base_stage(self.name))

    def _adapter_base_stage(self, stage: str) -> str | None:
        """The stage whose model a stage's adapter sits on, from the adapter's base.json (None:
        the recipe's model). With model.lora.continue_adapter that is the first stage's base."""
        record_file = self.run / stage / ADAPTER_DIR / "base.json"
        if not record_file.is_file():
            return self.model_from if stage == self.name else self._earlier(stage)
        return json.loads(record_file.read_text()).get("stage") or None

    def _earlier(self, stage: str) -> str | None:
        """The stage folder whose model `stage`'s started from (None: the recipe's model)."""
        head, _, _ = stage.rpartition("/")
        number = head.removeprefix("round-")
        if head.startswith("round-") and number.isdigit():
            return round_start(self.recipe, int(number))
        return self.recipe.model_stage_before(stage)

    # ------------------------------------------------------------------ data

    def _sources(self) -> list[tuple[str, dict[str, Any], str]]:
        """(split, source, origin) of the stage's data."""
        data = self.section.get("data") or {}
        return [
            (split, data[split], self.recipe.origin((self.kind, "data", split)))
            for split in ("train", "eval")
            if data.get(split)
        ]

    def _prompts(self, split: str) -> dict[str, Any] | None:
        """The prompts the annotate stage's pairs of a split were sampled on: generate.prompts,
        or for the held-out split generate.eval_prompts when given."""
        generate = self.settings.get("generate") or {}
        if split == "eval" and generate.get("eval_prompts"):
            return generate["eval_prompts"]
        return generate.get("prompts")

    def _hub_datasets(self) -> list[str]:
        names = []
        for split, source, origin in self._sources():
            if origin == "annotate stage":
                source = self._prompts(split) or {}
            path = source.get("path")
            if path and not _is_local(path):
                names.append(path)
        return list(dict.fromkeys(names))

    def _data(self) -> str:
        lines = []
        for split, source, origin in self._sources():
            role = {"train": "Training", "eval": "Held out"}[split]
            if origin == "annotate stage":
                lines.append(f"- {role}: {self._annotated(split)}")
            else:
                lines.append(f"- {role}: {_source_text(source)}")
        return "\n".join(lines) or "None recorded."

    def _annotated(self, split: str) -> str:
        """Where the pairs an annotate stage made come from: the prompts sampled, the scorer."""
        annotate = self.settings.get("annotate") or {}
        reward = annotate.get("reward") or {}
        scorer = reward.get("model") or reward.get("function") or "the recipe's reward"
        if _is_local(scorer.split(":")[0]):
            scorer = Path(scorer).name
        prompts = self._prompts(split)
        sampled = _source_text(prompts) if prompts else "the recipe's prompts"
        held_out = ""
        generate = self.settings.get("generate") or {}
        if split == "eval" and not generate.get("eval_prompts"):
            held_out = f" (a held-out share of {annotate.get('eval_fraction')} of those pairs)"
        selection = SELECTIONS.get(annotate.get("selection"), annotate.get("selection"))
        # With rounds: this round's stages, on its slice of the prompts.
        round_, _, _ = self.name.rpartition("/")
        rounds = self.settings.get("rounds") or {}
        if round_ and split == "train" and rounds.get("prompts") == "split":
            sampled += f" (slice {round_.removeprefix('round-')} of {rounds.get('count')})"
        at = f"{round_}/" if round_ else ""
        return (
            f"on-policy pairs this pipeline made: the `{at}generate` stage sampled the policy on "
            f"{sampled}, and the `{at}annotate` stage scored the samples with `{scorer}` and "
            f"paired them {selection}{held_out}"
        )

    # ------------------------------------------------------------------ settings

    def _hyperparameters(self) -> str:
        rows: list[tuple[str, Any]] = []
        s = self.section
        if self.kind == "sft":
            rows.append(("loss", "sft (cross-entropy on the assistant turns)"))
        if self.kind == "preference":
            loss = s["loss"]
            rows.append(("loss", f"{loss} ({LOSS_NAMES[loss]})"))
            if loss == "simpo":
                beta = s["beta"]
                gamma = s.get("gamma")
                ratio = s.get("gamma_beta_ratio")
                if gamma is None:
                    gamma = beta * ratio
                else:
                    ratio = gamma / beta
                rows += [
                    ("beta", beta),
                    ("gamma_beta_ratio (gamma / beta)", ratio),
                    ("gamma (= beta x gamma_beta_ratio)", gamma),
                ]
                rows += [(k, s[k]) for k in ("loss_type", "label_smoothing", "sft_weight",
                                             "length_normalize") if k in s]  # fmt: skip
            else:
                rows += [(k, s[k]) for k in LOSS_DEFAULTS[loss] if k in s and k != "reference"]
                if s.get("reference"):
                    reference = s["reference"]
                    model = reference.get("model")
                    shown = _model_name(model)[1] if model else "the stage's start model"
                    rows.append(("reference", f"{reference.get('mode')}, {shown}"))
        data = s.get("data") or {}
        rows += [(k, data[k]) for k in ("max_length", "max_prompt_length", "tokenization")
                 if k in data]  # fmt: skip
        t = s.get("training") or {}
        rows += [(k, t[k]) for k in ("learning_rate", "lr_scheduler_type", "warmup_ratio")]
        if t.get("max_steps", -1) > 0:
            rows.append(("max_steps", t["max_steps"]))
        else:
            rows.append(("num_train_epochs", t["num_train_epochs"]))
        world = self.recipe.launch.world_size
        rows += [
            ("per_device_train_batch_size", t["per_device_train_batch_size"]),
            ("processes", world),
            ("gradient_accumulation_steps", self.recipe.accumulation_steps(self.kind)),
            ("total batch (examples per optimizer step)", self.recipe.total_batch(self.kind)),
        ]
        rows += [(k, t[k]) for k in ("optim", "weight_decay", "adam_beta1", "adam_beta2",
                                     "adam_epsilon", "max_grad_norm", "seed")]  # fmt: skip
        precision = "bf16" if t.get("bf16") else "fp16" if t.get("fp16") else "fp32"
        rows += [("precision", precision), ("gradient_checkpointing", t["gradient_checkpointing"])]
        model = self.settings["model"]
        if model.get("lora"):
            lora = model["lora"]
            rows += [(f"lora.{k}", lora[k]) for k in ("r", "alpha", "dropout", "target_modules")]
            if model.get("quantization"):
                rows.append(("quantization", model["quantization"]))
        lines = ["| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_value(value)} |" for key, value in rows]
        return "\n".join(lines) + (
            "\n\nEvery setting, defaults included: `resolved_recipe.yaml` beside this card; the "
            "training curves: `metrics.jsonl`."
        )

    # ------------------------------------------------------------------ pipeline, evaluation

    def _pipeline(self) -> str:
        pipeline = list(self.settings.get("pipeline") or [])
        recipe = f"Recipe `{self.settings['name']}`"
        if self.kind not in pipeline:
            return (
                f"{recipe}: this stage was run on its own (`simpo {self.kind}`), outside the "
                f"recipe's pipeline ({' -> '.join(pipeline)})."
            )
        shown = " -> ".join(f"**{s}**" if s == self.kind else s for s in pipeline)
        place = pipeline.index(self.kind) + 1
        return f"{recipe}: {shown}. This model is stage {place} of {len(pipeline)}, `{self.kind}`."

    def _evaluation_note(self) -> str:
        """What the card says before the evaluate stage has scored the model."""
        if self.recipe.evaluate is None or "evaluate" not in self.recipe.pipeline:
            return ""
        if self.kind not in [entry for _, entry in self.recipe.evaluate_checkpoints()]:
            return ""
        return (
            "## Evaluation\n\nThis pipeline's `evaluate` stage scores this model; its "
            "comparison table replaces this line when it has."
        )

    # ------------------------------------------------------------------ how to load it

    def _where(self, stage: str | None = None) -> tuple[str, str]:
        """(what from_pretrained takes, its extra arguments) for a stage's folder (this one by
        default): its repository when that stage is pushed, else the folder."""
        stage = stage or self.name
        if stage in self.targets:
            repo, revision = self.targets[stage]
            return repo, f', revision="{revision}"' if revision else ""
        return f"path/to/{stage}", ""

    def _model_lines(self, stage: str | None) -> list[str]:
        """Python lines that leave the model of `stage` (None: the recipe's) in `base`: its
        merged model where the stage wrote one, else its own base with its adapter merged."""
        if stage is None:
            root = self._root()[0] or "path/to/base"
            return [f'base = AutoModelForCausalLM.from_pretrained("{root}")']
        where, extra = self._where(stage)
        if (self.run / stage / "config.json").is_file():
            return [f'base = AutoModelForCausalLM.from_pretrained("{where}"{extra})']
        merge = f'PeftModel.from_pretrained(base, "{where}"{extra}, subfolder="{ADAPTER_DIR}")'
        return [
            *self._model_lines(self._adapter_base_stage(stage)),
            f"base = {merge}.merge_and_unload()",
        ]

    def _usage(self) -> str:
        where, extra = self._where()
        return f"""\
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}"{extra})
tokenizer = AutoTokenizer.from_pretrained("{where}"{extra})
messages = [{{"role": "user", "content": "Hello!"}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs, max_new_tokens=256)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""

    def _adapter_usage(self, in_adapter: bool) -> str:
        """peft's loading on the base: from the repository's adapter/ when this stage is pushed,
        else from the folder."""
        base_stage = self._adapter_base_stage(self.name)
        where, extra = self._where()
        if in_adapter and self.name not in self.targets:
            where, sub = f"{where}/{ADAPTER_DIR}", ""
        else:
            sub = f', subfolder="{ADAPTER_DIR}"'
        base = "\n".join(self._model_lines(base_stage))
        note = ""
        if self._root()[0] is None and "path/to/base" in base:
            note = (
                "\n\nThe recipe's model is not on the hub (see Model above): load it from its "
                "folder, or let `simpo eval` load this adapter on its base as the run built it "
                "(adapter/base.json records it). Where the stage wrote the merged model, that "
                "loads on its own."
            )
        return f"""\
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

{base}
model = PeftModel.from_pretrained(base, "{where}"{extra}{sub})
tokenizer = AutoTokenizer.from_pretrained("{where}"{extra}{sub})
```{note}"""


# --------------------------------------------------------------------------- helpers


def _is_local(path: str | None) -> bool:
    """A path of this machine rather than a hub name (recipe paths that exist are made
    absolute as the recipe loads)."""
    return bool(path) and (Path(path).is_absolute() or path.startswith((".", "~")))


def _model_name(path: str | None) -> tuple[str | None, str]:
    if not path:
        return None, "unknown"
    if _is_local(path):
        return None, f"a local model folder, `{Path(path).name}` (not on the hub)"
    return path, f"[`{path}`]({HUB}/{path})"


def _source_text(source: dict[str, Any]) -> str:
    path = source.get("path", "")
    if _is_local(path):
        text = f"`{Path(path).name}` (a local file or folder)"
    else:
        text = f"[`{path}`]({HUB}/datasets/{path})"
    text += f", split `{source.get('split', 'train')}`"
    if source.get("subset"):
        text += f", subset `{source['subset']}`"
    if source.get("max_rows"):
        text += f", its first {source['max_rows']} rows"
    return text


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)
