"""Evaluate checkpoints: `simpo eval` and the evaluate stage both call `evaluate_checkpoints`.

For each checkpoint, in order: its held-out pair numbers (pairs.py), its answers to each
benchmark in the official evaluators' files (answers.py) with judge-free proxies, and its
lm-evaluation-harness tasks (lmeval.py). Then the reward-model win rates of each benchmark's
answers against the chosen opponent (winrate.py; the opponent may be another checkpoint, so
every checkpoint answers first), and one comparison of all checkpoints (compare.py).

Output folder:

    comparison.md / .csv / .json    one row per checkpoint (compare.py)
    comparison.png                  the plots (with matplotlib)
    rounds.json, rounds.png         with rounds: held-out reward, win rates and reply length
                                    by round (rounds.py)
    alpaca_eval/<label>/model_outputs.json          what `alpaca_eval --model_outputs` reads
    arena_hard/model_answer/<label>.jsonl           arena-hard-auto's model_answer/ files
    mt_bench/model_answer/<label>.jsonl             FastChat llm_judge's model_answer/ files
    checkpoints/<label>/pairs.json                  per-pair numbers and their summary
    checkpoints/<label>/<benchmark>/                generation passes, judge_free.json,
                                                    win_rate.json
    checkpoints/<label>/lm_eval/lm_eval.json

Every process of a launch runs this: pairs are dealt by batches and generation by questions
across the processes; the main process writes the files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simpo_cli.data.reuse import keep_whole
from simpo_cli.distributed import barrier, is_main_process, say
from simpo_cli.errors import UserError
from simpo_cli.evaluate import benchmarks, compare, rounds, winrate
from simpo_cli.evaluate.answers import (
    answer_benchmark,
    check_chat_template,
    check_references,
    side_by_side,
)
from simpo_cli.evaluate.lmeval import run_lm_eval
from simpo_cli.evaluate.pairs import evaluate_pairs
from simpo_cli.model import adapters
from simpo_cli.model.adapters import ADAPTER_DIR, has_model
from simpo_cli.model.load import full_model_folder, weights_identity
from simpo_cli.onpolicy.annotate import gather_scores, make_scorer
from simpo_cli.onpolicy.rewards import load_reward_function
from simpo_cli.onpolicy.sampling import resolve_backend
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import TRAINING_STAGES, EvaluateStage, Recipe

EVALUATED_DIR = "evaluated"  # DIR/evaluated/<key>/: a sweep's shared benchmark samples


@dataclass(frozen=True)
class Checkpoint:
    """A model folder to evaluate and its label: the table's row and the answer files' model
    name."""

    label: str
    path: str


def run_folder_checkpoints(folder: Path) -> tuple[list[Checkpoint], list[str]]:
    """The finished training stages' models of a run folder (`simpo train -o FOLDER`), in
    pipeline order (every round's preference model, round-<r>/preference, labelled
    <run>-round-<r>), labelled <run>-<stage>, and one line per stage folder saying whether it is
    scored or skipped (unfinished: its newest complete checkpoint is what to pass instead).
    ([], []) when the folder is not a run folder."""
    found, lines = [], []
    numbered = [(int(p.name.removeprefix("round-")), p) for p in folder.glob("round-*")
                if p.name.removeprefix("round-").isdigit()]  # fmt: skip
    stages = [(stage, stage) for stage in TRAINING_STAGES]
    at = TRAINING_STAGES.index("preference")
    stages[at:at] = [(f"round-{r}", f"round-{r}/preference") for r, _ in sorted(numbered)]
    for stage, where in stages:
        stage_dir = StageDir(folder / where)
        if not stage_dir.path.is_dir():
            continue
        if stage_dir.is_complete() and has_model(stage_dir.path):
            label = f"{folder.resolve().name}-{stage}"
            found.append(Checkpoint(label, str(stage_dir.path)))
            lines.append(f"{folder}: scoring {stage} ({stage_dir.path}) as {label}")
        elif any(stage_dir.path.iterdir()):
            lines.append(f"{folder}: skipping {stage}: {unfinished_stage(stage_dir, stage)}")
    return found, lines


def unfinished_stage(stage_dir: StageDir, stage: str) -> str:
    """Why an unfinished stage folder has no model to score, and what to pass instead."""
    newest = stage_dir.last_checkpoint()
    if newest is None:
        return (
            f"the {stage} stage has not finished and has saved no complete checkpoint yet; "
            "evaluate it once it has"
        )
    return (
        f"the {stage} stage has not finished; to score it now, pass its newest complete "
        f"checkpoint, {newest}"
    )


def is_stage_folder(folder: Path) -> bool:
    """A folder a stage writes (its recipe, or its checkpoints while it trains)."""
    return StageDir(folder).recipe_file.is_file() or any(folder.glob("checkpoint-*"))


def resolve_checkpoints(
    paths: list[str], label: str | None = None
) -> tuple[list[Checkpoint], list[str]]:
    """Model folders as given, each run folder replaced by its finished stages' models, and one
    line per run folder's stage: scored or skipped. Labels are the folder names; `label` names a
    single checkpoint. Two checkpoints with one label are an error (the answer files would
    overwrite each other), and so is a stage folder without its model yet."""
    checkpoints: list[Checkpoint] = []
    report: list[str] = []
    for path in paths:
        folder = Path(path)
        if folder.is_dir() and not has_model(folder):
            if is_stage_folder(folder):
                raise UserError(f"{path}: {unfinished_stage(StageDir(folder), folder.name)}")
            inside, lines = run_folder_checkpoints(folder)
            if not inside:
                raise UserError(
                    f"{path}: neither a model folder (no config.json), nor an adapter folder "
                    "(no adapter_config.json), nor a run folder with a finished stage"
                    + (f" ({'; '.join(lines)})" if lines else "")
                    + "; give a folder a model was saved to, or the folder `simpo train -o` wrote"
                )
            report += lines
            checkpoints += inside
        else:
            named = folder.resolve()
            if named.name == ADAPTER_DIR and (named.parent / "stage_complete.json").is_file():
                named = named.parent  # a stage's adapter/ is labelled like its stage
            checkpoints.append(Checkpoint(named.name, path))
    if label is not None:
        if len(checkpoints) != 1:
            raise UserError(
                f"--model-id {label}: names one checkpoint, but {len(checkpoints)} are given; "
                "leave it out (each is named after its folder)"
            )
        checkpoints = [Checkpoint(label, checkpoints[0].path)]
    labels = [c.label for c in checkpoints]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise UserError(
            f"checkpoints: {', '.join(twice)} names more than one folder; their answer files "
            "would overwrite each other: evaluate them in separate runs, or rename a folder"
        )
    return checkpoints, report


def evaluate_checkpoints(
    checkpoints: list[Checkpoint],
    settings: EvaluateStage,
    output_dir: Path,
    reference: str | None = None,
    against_key: str = "--against",
    held_out: Recipe | None = None,
    shared: Path | None = None,
) -> dict[str, Any]:
    """Evaluate every checkpoint; returns {"checkpoints": {label: results}, "files": [...]}
    and writes the comparison into output_dir (main process). `reference` is the reference
    model's folder (settings.reference resolved by the caller). `held_out`: a recipe with
    rounds whose held-out prompts every checkpoint also answers, scored with its reward and
    compared row to row (rounds.py). `shared`: where each model's benchmark samples are kept
    once sampled (a folder per model, label and benchmark settings), so that a later evaluation
    of the same model the same way (the next point of a sweep) reads them rather than sampling
    them again."""
    questions, opponents = _inputs(checkpoints, settings, against_key)
    scorer = make_scorer(held_out.annotate.reward) if held_out and held_out.annotate else None
    results: dict[str, dict[str, Any]] = {}
    # An adapter-only checkpoint or reference is read as its merged model, written for the
    # while (the reference once, for every checkpoint's pairs).
    reference_scratch = output_dir / "merged_reference"
    with full_model_folder(
        reference if settings.pairs is not None else None, reference_scratch
    ) as reference_folder:
        for checkpoint in checkpoints:
            results[checkpoint.label] = _evaluate_one(
                checkpoint, settings, questions, output_dir, reference, reference_folder, shared
            )
            if held_out is not None and scorer is not None:
                say(f"[evaluate] {checkpoint.label}: answering the held-out prompts")
                work = output_dir / "checkpoints" / checkpoint.label
                with full_model_folder(checkpoint.path, work / "merged_model") as path:
                    results[checkpoint.label]["held_out"] = rounds.held_out(
                        held_out, path, settings.dtype, scorer, work
                    )
    if held_out is not None:
        rounds.compare_rounds(results)

    for bench in settings.benchmarks:
        if bench.against is not None:
            opponent = opponents.get(bench.name) or _checkpoint_opponent(
                bench, questions[bench.name], output_dir, against_key
            )
            _win_rates(checkpoints, bench, questions[bench.name], opponent, settings, output_dir,
                       results, against_key)  # fmt: skip
    files: list[str] = []
    if is_main_process():
        for bench in settings.benchmarks:
            if bench.exact_match:
                _print_side_by_side(checkpoints, bench, questions[bench.name], output_dir)
        files = compare.write_comparison(results, output_dir)
        if held_out is not None:
            files += rounds.write_rounds(held_out, results, output_dir)
    barrier()
    return {"checkpoints": results, "files": files}


def _inputs(checkpoints, settings, against_key: str):
    """What can be wrong in the inputs, found before any model loads or any file is written:
    each benchmark's questions (returned), the generation backend, Arena-Hard's tiktoken and its
    encoding, the opponents that are not checkpoints evaluated here (returned), the reward
    function."""
    order = [c.label for c in checkpoints]
    labels = set(order)
    questions, opponents = {}, {}
    for checkpoint in checkpoints if settings.benchmarks else []:
        check_chat_template(checkpoint.path)
    if settings.benchmarks:
        resolve_backend(settings.backend)
    for bench in settings.benchmarks:
        questions[bench.name] = benchmarks.load_questions(bench.name, bench.questions)
        if bench.exact_match:
            check_references(questions[bench.name])
        if bench.name == "arena_hard":
            benchmarks.tiktoken_counter(benchmarks.ARENA_TIKTOKEN_MODEL[bench.arena_layout])
        if bench.against is not None and bench.against not in labels:
            opponents[bench.name] = winrate.opponent_replies(
                bench.name, questions[bench.name], bench.against, against_key, order
            )
    if settings.reward is not None and settings.reward.function is not None:
        load_reward_function(settings.reward.function, _reward_keys(against_key)[0])
    return questions, opponents


def _evaluate_one(
    checkpoint, settings, questions, output_dir, reference, reference_folder, shared=None
):
    """One checkpoint's pairs, benchmark answers and lm-eval tasks. `reference_folder` holds
    the model `reference` names (its merged copy for an adapter); `shared`: see
    evaluate_checkpoints."""
    work = output_dir / "checkpoints" / checkpoint.label
    entry: dict[str, Any] = {"path": checkpoint.path}
    if adapters.adapter_only(checkpoint.path) is not None:
        say(f"[evaluate] {checkpoint.label}: merging its adapter into its base")
    with full_model_folder(checkpoint.path, work / "merged_model") as path:
        model = replace(checkpoint, path=path)
        if settings.pairs is not None:
            say(f"[evaluate] {checkpoint.label}: scoring pairs of {settings.pairs.path}")
            itself = Path(checkpoint.path).resolve()
            if reference is not None and Path(reference).resolve() == itself:
                reference = reference_folder = None  # the implicit reward against itself is 0
            named = (checkpoint.path, reference)
            entry["pairs"] = _pairs(model, settings, work, reference_folder, named)
        for bench in settings.benchmarks:
            say(f"[evaluate] {checkpoint.label}: answering {bench.name}")
            kept = _kept_samples(shared, checkpoint, path, bench, settings)
            entry.setdefault("benchmarks", {})[bench.name] = _answers(
                model, bench, questions[bench.name], settings, output_dir, work, kept
            )
        if settings.lm_eval is not None:
            say(f"[evaluate] {checkpoint.label}: lm-eval {', '.join(settings.lm_eval.tasks)}")
            entry["lm_eval"] = _lm_eval(model, settings, work)
    return entry


def _reward_keys(against_key: str) -> tuple[str, str]:
    """How the user named the reward function and model: flags, or recipe keys."""
    if against_key.startswith("--"):
        return "--reward-function", "--reward-model"
    return "evaluate.reward.function", "evaluate.reward.model"


def _pairs(checkpoint, settings, work: Path, reference: str | None, named) -> dict[str, Any]:
    output = str(work / "pairs.json")
    result = evaluate_pairs(checkpoint.path, settings, output, reference, named)
    # The scatter of the comparison plot: every response's length and average log-prob.
    points = {
        "tokens": [p[f"{s}_tokens"] for s in ("chosen", "rejected") for p in result["pairs"]],
        "logps": [p[f"{s}_logps"] for s in ("chosen", "rejected") for p in result["pairs"]],
    }
    return result["summary"] | {"points": points}


def answers_dir(output_dir: Path, benchmark: str, label: str) -> Path:
    """Where a checkpoint's official answer file goes: AlpacaEval's model_outputs.json has a
    fixed name (one folder per checkpoint); Arena-Hard and MT-Bench name the file after the
    model inside one model_answer/ folder, as their judges read it."""
    if benchmark == "alpaca_eval":
        return output_dir / benchmark / label
    return output_dir / benchmark


def _kept_samples(shared: Path | None, checkpoint, path: str, bench, settings) -> Path | None:
    """The folder under `shared` that keeps this model's samples for `bench`, keyed by its
    weights (files, sizes, times), the folder it is read from, its label, the benchmark's
    settings and questions, the backend and dtype."""
    if shared is None:
        return None
    questions = Path(bench.questions) if bench.questions else None
    what = {
        "model": weights_identity(checkpoint.path),
        "read_from": path,
        "label": checkpoint.label,
        "benchmark": bench.model_dump(),
        "questions": hashlib.sha256(questions.read_bytes()).hexdigest()
        if questions is not None and questions.is_file()
        else None,
        "backend": settings.backend,
        "dtype": settings.dtype,
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return shared / key[:32]


def _answers(checkpoint, bench, questions, settings, output_dir, work, kept=None):
    """One checkpoint's answers to one benchmark. With `kept` (_kept_samples): the samples an
    earlier evaluation kept there are copied in first, so that only what is missing is sampled
    (nothing, when it finished), and once all are sampled they are kept there for the next.
    Points running at once each sample for themselves; the first to finish keeps its samples."""
    generation = work / bench.name / "generation"
    if kept is not None and kept.is_dir() and not generation.exists():
        if is_main_process():
            say(f"[evaluate] {checkpoint.label}: {bench.name} samples read from {kept}, as an "
                "earlier evaluation of this model left them")  # fmt: skip
            shutil.copytree(kept, generation)
        barrier()
    summary = answer_benchmark(
        checkpoint.path,
        bench.name,
        answers_dir(output_dir, bench.name, checkpoint.label),
        work / bench.name,
        bench.questions,
        checkpoint.label,
        bench.family,
        bench.arena_layout,
        bench.temperature,
        bench.max_new_tokens,
        settings.backend,
        settings.dtype,
        questions,
        exact_match=bench.exact_match,
    )
    if kept is not None and is_main_process() and not kept.exists():
        keep_whole(kept, lambda folder: shutil.copytree(generation, folder))
    counts = answer_counts(summary, questions)
    say(f"[evaluate] {checkpoint.label}: wrote {summary['answers']} ({counts})")
    return summary


def answer_counts(summary: dict[str, Any], questions) -> str:
    """How many questions were answered, and over how many turns when a question has several
    (MT-Bench): lengths and cuts are per turn."""
    turns, mean, cut = (
        summary["turns_generated"],
        summary["mean_tokens"],
        summary["cut_at_max_new_tokens"],
    )
    if turns == len(questions):
        return f"{len(questions)} answers, mean {mean:.1f} tokens, {cut:.1%} cut at max_new_tokens"
    return (
        f"{len(questions)} answers in {turns} turns, mean {mean:.1f} tokens per turn, {cut:.1%} "
        "of turns cut at max_new_tokens"
    )


def _print_side_by_side(checkpoints, bench, questions, output_dir: Path) -> None:
    """A few answers of every checkpoint beside the reference, read back from the answer files
    just written, and each checkpoint's exact-match share."""
    replies = {}
    for checkpoint in checkpoints:
        folder = answers_dir(output_dir, bench.name, checkpoint.label)
        path = benchmarks.answer_path(bench.name, folder, checkpoint.label)
        replies[checkpoint.label] = winrate.read_replies(bench.name, questions, path)[1]
    for line in side_by_side(bench.name, questions, replies):
        print(f"[evaluate] {line}", flush=True)


def _lm_eval(checkpoint, settings, work: Path) -> dict[str, Any]:
    lm = settings.lm_eval
    return run_lm_eval(
        checkpoint.path,
        lm.tasks,
        work / "lm_eval",
        include_path=lm.include_path,
        limit=lm.limit,
        num_fewshot=lm.num_fewshot,
        batch_size=lm.batch_size,
        dtype=settings.dtype,
        apply_chat_template=lm.apply_chat_template,
    )


def _checkpoint_opponent(bench, questions, output_dir: Path, key: str):
    """Another checkpoint evaluated here, as the opponent: its answer file, just written."""
    folder = answers_dir(output_dir, bench.name, bench.against)
    path = benchmarks.answer_path(bench.name, folder, bench.against)
    _, replies = winrate.opponent_replies(bench.name, questions, str(path), key)
    return bench.against, replies


def _win_rates(checkpoints, bench, questions, opponent, settings, output_dir, results, key):
    """Score each checkpoint's answers and the opponent's (opponent: (name, replies)) with
    settings.reward; the scores are split over the processes."""
    opponent_name, replies_against = opponent
    scorer = make_scorer(settings.reward, *_reward_keys(key))
    for checkpoint in checkpoints:
        if checkpoint.label == bench.against:
            continue
        folder = answers_dir(output_dir, bench.name, checkpoint.label)
        path = benchmarks.answer_path(bench.name, folder, checkpoint.label)
        _, replies = winrate.read_replies(bench.name, questions, path, checkpoint.label)
        records = winrate.win_rate_records(questions, replies, replies_against)
        scores = gather_scores(records, scorer)
        summary = winrate.summarize_win_rates(records, scores, opponent_name)
        work = output_dir / "checkpoints" / checkpoint.label / bench.name
        if is_main_process():
            (work / "win_rate.json").write_text(json.dumps(summary, indent=2) + "\n")
            for line in winrate.summary_lines(summary, checkpoint.label):
                print(f"[evaluate] {bench.name}: {line}", flush=True)
        summary = {k: v for k, v in summary.items() if k != "rows"}
        results[checkpoint.label]["benchmarks"][bench.name]["win_rate"] = summary


def run(
    recipe, stage: EvaluateStage, stage_dir: StageDir, output_dir: Path, shared: Path | None = None
) -> dict[str, Any]:
    """The evaluate stage: the recipe's checkpoints (its training stages' folders in output_dir,
    labelled <recipe>-<stage>, every round's model with rounds, or model folders) into the stage
    folder; returns the comparison rows for stage_complete.json. `shared`: see
    evaluate_checkpoints (a sweep's points)."""

    def folder(entry: str | None) -> str | None:
        # With rounds, a stage they repeat stands for its last round's folder.
        return str(output_dir / recipe.final_folder(entry)) if entry in TRAINING_STAGES else entry

    # A stage's model is named <recipe>-<stage> (with rounds, <recipe>-round-<r>) in the answer
    # files (judges compare models of many runs); a model folder keeps its name.
    entries = recipe.evaluate_rows()
    labels = {name: f"{recipe.name}-{name}" if stage else name for name, _, stage in entries}
    if recipe.rounds is not None and "preference" not in labels:  # against: the last round
        labels["preference"] = labels.get(f"round-{recipe.rounds.count}", "preference")
    checkpoints = [
        Checkpoint(labels[name], str(output_dir / where) if stage else where)
        for name, where, stage in entries
    ]
    benchmarks = [
        bench.model_copy(update={"against": labels.get(bench.against, bench.against)})
        for bench in stage.benchmarks
    ]
    settings = stage.model_copy(update={"pairs": recipe.evaluate_pairs(), "benchmarks": benchmarks})
    result = evaluate_checkpoints(
        checkpoints,
        settings,
        stage_dir.path,
        folder(stage.reference),
        "evaluate.benchmarks.against",
        recipe if recipe.compares_rounds() else None,
        shared,
    )
    columns, rows = compare.comparison_rows(result["checkpoints"])
    say(compare.markdown_table(columns, rows).rstrip())
    for path in result["files"]:
        say(f"[evaluate] wrote {path}")
    return {"columns": columns, "rows": rows}
