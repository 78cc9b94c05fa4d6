"""The lm-evaluation-harness bridge (simpo_cli/evaluate/lmeval.py) on the tiny model, offline.

The task is tests/assets/lm_eval_task/tiny_sort.yaml: ten multiple-choice questions in the tiny
recipe's domain ("Sort: 2 6 0 1" -> four orderings, one sorted). The numbers lm-eval reports are
checked against log-likelihoods computed here with plain transformers, under the same rendering
(the chat template with its generation prompt, one BOS).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model

from simpo_cli.errors import UserError
from simpo_cli.evaluate.lmeval import INSTALL_HINT, flatten_results, run_lm_eval

TASK_DIR = Path(__file__).parent / "assets" / "lm_eval_task"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def copy_with_template(src: Path, dest: Path, template: str | None) -> Path:
    """A copy of a checkpoint folder with another chat template, or none."""
    shutil.copytree(src, dest)
    if template is None:
        (dest / "chat_template.jinja").unlink()
    else:
        (dest / "chat_template.jinja").write_text(template)
    return dest


def choice_logprobs(model_dir: Path, rows: list[dict]) -> list[list[float]]:
    """log p(choice | chat prompt) for every choice of every row, summed over the choice's tokens.

    The prompt is the user turn rendered by the chat template with the assistant header
    (add_generation_prompt), tokenized without adding special tokens: the template writes the
    one BOS.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert prompt_ids.count(tokenizer.bos_token_id) == 1 and prompt_ids[0] == 0
        row_scores = []
        for choice in row["choices"]:
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + choice_ids])
            with torch.no_grad():
                logps = model(ids).logits[0, :-1].float().log_softmax(-1)
            # The token at position t is predicted by the logits at t - 1.
            targets = ids[0, len(prompt_ids) :]
            picked = logps[len(prompt_ids) - 1 :].gather(-1, targets[:, None])
            row_scores.append(picked.sum().item())
        scores.append(row_scores)
    return scores


def write_task(folder: Path, name: str, rows: list[dict], answers: list[int]) -> None:
    """The tiny_sort task under another name and answers, read with `dataset_path: json`."""
    data = folder / f"{name}.jsonl"
    lines = [json.dumps(row | {"answer": a}) for row, a in zip(rows, answers, strict=True)]
    data.write_text("".join(line + "\n" for line in lines))
    config = (TASK_DIR / "tiny_sort.yaml").read_text()
    config = config.replace("task: tiny_sort", f"task: {name}").replace(
        "custom_dataset: !function data.load",
        # An absolute path: lm-eval resolves data_files against the current directory.
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}",
    )
    (folder / f"{name}.yaml").write_text(config)


def test_results_match_loglikelihoods_computed_here(tiny_dir, tmp_path):
    """tiny_sort's accuracy is the share of rows whose gold choice has the highest
    log-likelihood computed here. Two copies of the task, whose answers are the choice ranked
    first here and the one ranked last, score 1.0 and 0.0: lm-eval ranks every row's choices as
    we do (without the chat template they score 0.3 and 0.3)."""
    pytest.importorskip("lm_eval")
    rows = [json.loads(line) for line in (TASK_DIR / "digits.jsonl").read_text().splitlines()]
    scores = choice_logprobs(tiny_dir, rows)
    for row_scores in scores:  # near-ties would make the 1.0 / 0.0 below fragile
        top, second = sorted(row_scores, reverse=True)[:2]
        assert top - second > 1e-3
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    worst = [min(range(len(s)), key=s.__getitem__) for s in scores]
    expected_acc = sum(b == row["answer"] for b, row in zip(best, rows, strict=True)) / len(rows)

    tasks = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, tasks)
    write_task(tasks, "tiny_sort_best", rows, best)
    write_task(tasks, "tiny_sort_worst", rows, worst)

    out = tmp_path / "out"
    names = ["tiny_sort", "tiny_sort_best", "tiny_sort_worst"]
    results = run_lm_eval(str(tiny_dir), names, out, include_path=str(tasks), device="cpu")

    assert set(results) == set(names)
    for metrics in results.values():
        assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())
    assert results["tiny_sort"]["acc"] == pytest.approx(expected_acc)
    assert results["tiny_sort_best"]["acc"] == 1.0
    assert results["tiny_sort_worst"]["acc"] == 0.0

    record = json.loads((out / "lm_eval.json").read_text())
    assert record["results"] == results
    assert record["tasks"] == names
    assert record["lm_eval_version"] == __import__("lm_eval").__version__
    assert record["settings"]["dtype"] == "float32"  # auto on the CPU
    assert record["settings"]["apply_chat_template"] is True
    assert record["samples"]["tiny_sort"]["effective"] == 10


def test_lm_eval_scores_the_prompt_we_render_with_one_bos(tiny_dir):
    """The template writes BOS and the tokenizer adds one by default (the plain call below gets
    two); lm-eval's HF backend sees the prompt already starts with it and adds none.

    Its log-likelihoods of each row's choices then equal ours up to one constant per row:
    lm-eval moves the prompt's trailing "\\n\\n" into the continuation and scores it too. A
    second BOS moves them apart by about 0.05 (tried by patching HFLM.tok_encode), which the
    ranking check of the test above does not see on this model.
    """
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from simpo_cli.evaluate.lmeval import check_single_bos

    lm = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    bos = lm.tokenizer.bos_token_id
    prompt = lm.apply_chat_template([{"role": "user", "content": "Sort: 3 1 2"}])
    assert prompt.startswith(lm.tokenizer.bos_token)
    assert lm.tokenizer(prompt)["input_ids"][:2] == [bos, bos]  # what lm-eval avoids

    scored = lm.tok_encode(prompt)  # log-likelihood requests
    generated = lm.tok_batch_encode([prompt])[0][0].tolist()  # generation requests
    for ids in (scored, generated):
        assert ids[0] == bos and ids.count(bos) == 1
    check_single_bos(lm, str(tiny_dir))

    rows = [json.loads(line) for line in (TASK_DIR / "digits.jsonl").read_text().splitlines()]
    for row, ours in zip(rows, choice_logprobs(tiny_dir, rows), strict=True):
        prompt = lm.apply_chat_template([{"role": "user", "content": row["question"]}])
        requests = [
            Instance("loglikelihood", row, (prompt, choice), i)
            for i, choice in enumerate(row["choices"])
        ]
        theirs = [logp for logp, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        offsets = [t - o for t, o in zip(theirs, ours, strict=True)]
        assert max(offsets) - min(offsets) < 1e-4


def test_a_template_that_puts_whitespace_before_bos_is_refused(tiny_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from simpo_cli.evaluate.lmeval import check_single_bos

    template = "\n" + (tiny_dir / "chat_template.jinja").read_text()
    folder = copy_with_template(tiny_dir, tmp_path / "newline", template)
    lm = HFLM(pretrained=str(folder), device="cpu", dtype="float32")
    with pytest.raises(UserError, match=r"2 BOS tokens \(<\|begin_of_text\|>\)"):
        check_single_bos(lm, str(folder))


def test_unknown_task_names_the_task_and_how_to_list_tasks(tiny_dir, tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(UserError) as err:
        run_lm_eval(
            str(tiny_dir), ["tiny_sortt", "tiny_sort"], tmp_path, include_path=str(TASK_DIR)
        )
    assert len(err.value.messages) == 1
    message = err.value.messages[0]
    assert message.startswith("--lm-eval tiny_sortt: no such task in lm-eval or under ")
    assert "did you mean tiny_sort" in message
    assert "`lm-eval ls tasks`" in message and "--lm-eval-include-path" in message
    assert not (tmp_path / "lm_eval.json").exists()


def test_missing_chat_template_is_a_user_error(tiny_dir, tmp_path):
    pytest.importorskip("lm_eval")
    folder = copy_with_template(tiny_dir, tmp_path / "no_template", None)
    with pytest.raises(UserError, match="--lm-eval-no-chat-template") as err:
        run_lm_eval(str(folder), ["tiny_sort"], tmp_path, include_path=str(TASK_DIR))
    assert err.value.messages[0].startswith(f"{folder}: the tokenizer has no chat template")


def test_without_lm_eval_installed_the_error_says_how_to_install(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError) as err:
        run_lm_eval(str(tiny_dir), ["tiny_sort"], tmp_path)
    assert err.value.messages == [INSTALL_HINT]
    assert err.value.exit_code == 2


def test_importing_the_module_imports_neither_lm_eval_nor_torch():
    code = (
        "import sys, simpo_cli.evaluate.lmeval; "
        "print(sorted({'lm_eval', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_flatten_results_strips_the_none_filter_and_keeps_numbers():
    raw = {
        "arc_easy": {
            "alias": "arc_easy",
            "sample_len": 10,
            "acc,none": 0.5,
            "acc_stderr,none": 0.1,
            "acc_norm,none": 0.25,
            "acc_norm_stderr,none": "N/A",
        },
        "gsm8k": {"exact_match,strict-match": 0.75, "exact_match,flexible-extract": 1},
    }
    assert flatten_results(raw) == {
        "arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25},
        "gsm8k": {"exact_match,strict-match": 0.75, "exact_match,flexible-extract": 1.0},
    }
