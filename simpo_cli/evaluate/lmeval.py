"""Benchmarks from lm-evaluation-harness (lm-eval) on a checkpoint folder; an optional extra:
pip install 'simpo-cli[lm-eval]'.

lm-eval is imported inside the functions, so the rest of the CLI runs without it. The checks a
user can act on come before the model loads: the chat template exists (prompts are rendered with
it by default, as the model was trained), and every task name is known to lm-eval's task index.
After loading, one more: lm-eval's tokenization of a rendered prompt holds exactly one BOS token
(the template writes one, and lm-eval asks the tokenizer for another unless the prompt already
starts with it; section 5 of ../shared/reference/evaluation.md).

Writes OUTPUT_DIR/lm_eval.json: the flattened results, the lm-eval version, the tasks and every
resolved setting.
"""

from __future__ import annotations

import difflib
import json
import numbers
from pathlib import Path
from typing import Any

from simpo_cli.errors import UserError

INSTALL_HINT = "--lm-eval needs lm-evaluation-harness: pip install 'simpo-cli[lm-eval]'"
RESULTS_FILE = "lm_eval.json"


def run_lm_eval(
    model_dir: str,
    tasks: list[str],
    output_dir: Path,
    *,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str | None = None,
    apply_chat_template: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the model in `model_dir`; returns {task: {metric: value}}.

    `tasks` are lm-eval task, group or tag names (`lm-eval ls tasks`), or the names of tasks
    defined in YAML files under `include_path`. dtype auto: bfloat16 on a GPU, float32 on the
    CPU. With the chat template, few-shot examples are given as earlier turns of the
    conversation (fewshot_as_multiturn), as a chat model meets them.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from simpo_cli.model.load import eval_device, resolve_dtype

    if not tasks:
        raise UserError("--lm-eval: name at least one task (list them with `lm-eval ls tasks`)")
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: no such checkpoint folder")
    torch_dtype = resolve_dtype(dtype)
    if apply_chat_template:
        _check_chat_template(model_dir)
    task_manager = _task_manager(tasks, include_path)

    device = device or str(eval_device())
    # Built here rather than passing model="hf" to simple_evaluate, so the BOS check below runs
    # on the very object that tokenizes the benchmark's prompts.
    lm = HFLM(pretrained=model_dir, dtype=torch_dtype, batch_size=batch_size, device=device)
    if apply_chat_template:
        check_single_bos(lm, model_dir)

    settings = {
        "include_path": include_path,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": device,
        "apply_chat_template": apply_chat_template,
        "fewshot_as_multiturn": apply_chat_template,
    }
    print(
        f"lm-eval {lm_eval.__version__} on {model_dir}: {', '.join(tasks)} ("
        + ", ".join(f"{key} {value}" for key, value in settings.items())
        + ")",
        flush=True,
    )
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        # Also for tasks whose YAML sets its own shots (num_fewshot None); no effect at 0 shots.
        fewshot_as_multiturn=apply_chat_template,
        log_samples=False,
    )
    if output is None:  # a process other than the first of a launch: the first one reports
        return {}
    results = flatten_results(output["results"])
    record = {
        "model": str(model_dir),
        "lm_eval_version": lm_eval.__version__,
        "tasks": list(tasks),
        "settings": settings,
        "results": results,
        "samples": output.get("n-samples"),  # per task: rows in the task, rows evaluated
        "task_versions": output.get("versions"),
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return results


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's per-task results as {task: {metric: value}}, numbers only.

    lm-eval keys a metric as "<metric>,<filter>": the filter "none" (the model's output as is)
    is dropped, so "acc,none" -> "acc" and "acc_stderr,none" -> "acc_stderr"; another filter
    stays in the name ("exact_match,strict-match"). Entries without a filter ("alias",
    "sample_len") and stderrs lm-eval did not compute ("N/A") are left out.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, entries in results.items():
        metrics = {}
        for key, value in entries.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            name, _, filter_name = key.partition(",")
            metrics[name if filter_name == "none" else key] = float(value)
        flat[task] = metrics
    return flat


def check_single_bos(lm: Any, model_dir: str) -> None:
    """Raise when lm-eval would give the model a chat-rendered prompt with two BOS tokens.

    `lm` is lm-eval's HFLM. Its tokenizer adds a BOS unless the rendered text already starts
    with the BOS string, so a template that writes its BOS after anything else (a newline
    left by the template's own line breaks) gets a second one. Both of lm-eval's encoding paths
    are checked: tok_encode (log-likelihood tasks) and tok_batch_encode (generation tasks).
    """
    tokenizer = lm.tokenizer
    bos = tokenizer.bos_token_id
    if bos is None:  # a tokenizer without BOS (Qwen, for one): nothing to double
        return
    prompt = lm.apply_chat_template([{"role": "user", "content": "Hello"}])
    scored = lm.tok_encode(prompt)
    generated = lm.tok_batch_encode([prompt])[0][0].tolist()
    count = max(scored.count(bos), generated.count(bos))
    if count > 1:
        raise UserError(
            f"{model_dir}: lm-eval would give the model {count} BOS tokens "
            f"({tokenizer.bos_token}) per prompt, the chat template's and the tokenizer's; make "
            "the template's output start with {{ bos_token }} (no whitespace before it) or "
            "drop the BOS from the template"
        )


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return lm_eval


def _check_chat_template(model_dir: str) -> None:
    from transformers import AutoTokenizer

    if not AutoTokenizer.from_pretrained(model_dir).chat_template:
        raise UserError(
            f"{model_dir}: the tokenizer has no chat template to render lm-eval's prompts with; "
            "add one (chat_template.jinja in the folder) or pass --lm-eval-no-chat-template to "
            "score plain-text prompts"
        )


def _task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task index (its own tasks and those under include_path), once every name in
    `tasks` is found in it or is a task YAML file; one line per unknown name otherwise."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).exists():
        raise UserError(f"--lm-eval-include-path {include_path}: no such folder")
    # Indexing reads every YAML of lm-eval's ~15,000 task configs: about 6 s, paid once here
    # and reused by simple_evaluate.
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    problems = []
    for name in tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = f" or under {include_path}" if include_path else ""
        problems.append(
            f"--lm-eval {name}: no such task in lm-eval{where}; {hint}list the tasks with "
            "`lm-eval ls tasks`, or pass the folder of your own task YAML files with "
            "--lm-eval-include-path"
        )
    if problems:
        raise UserError(problems)
    return manager
