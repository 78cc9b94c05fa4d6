"""What `simpo eval` does once its flags are settings: check the paths, name the checkpoints,
then evaluate them here (pairs without --output-dir: one printed line per checkpoint and, for
several, the comparison table; else the comparison in --output-dir) or re-launch the command
through `accelerate launch`.

Loads torch only when it evaluates or launches: the path checks come first, without it.
"""

from __future__ import annotations

import os
import shlex
import sys
import uuid
from pathlib import Path

from simpo_cli import launch, progress
from simpo_cli.errors import UserError
from simpo_cli.evaluate.compare import comparison_rows, markdown_table
from simpo_cli.launch import LAUNCH_ID
from simpo_cli.recipe import EvaluateStage, LaunchSettings
from simpo_cli.run.paths import check_evaluate_paths


def evaluate_models(
    models: list[str],
    settings: EvaluateStage,
    launch_settings: LaunchSettings,
    pairs_output: str | None,
    output_dir: Path | None,
    model_id: str | None,
    child_args: list[str],
) -> None:
    """Evaluate `models` as `simpo eval` does; `child_args`: the command for launched
    processes."""
    check_evaluate_paths(models, settings, pairs_output, output_dir)
    from simpo_cli.evaluate.checkpoints import evaluate_checkpoints, resolve_checkpoints

    checkpoints, report = resolve_checkpoints(models, model_id)  # a run folder: its stages
    if pairs_output is not None and len(checkpoints) != 1:
        raise UserError(
            f"--pairs-output: writes one checkpoint's pairs, but {len(checkpoints)} are given "
            f"({', '.join(c.label for c in checkpoints)}); use -o DIR for several"
        )
    if output_dir is None and (settings.benchmarks or settings.lm_eval is not None):
        what = (
            "--benchmark writes answer files" if settings.benchmarks else "--lm-eval writes results"
        )
        raise UserError(
            f"simpo eval: {what}; give -o DIR (--output-dir): the folder for them and the "
            "comparison table"
        )
    if not launch.inside_launch():  # said once, not again by the launched processes
        for line in report:
            print(line, flush=True)
    if launch.needs_launch(launch_settings) and not launch.inside_launch():
        sys.exit(_launch_eval(launch_settings, child_args))
    from simpo_cli.distributed import say, shutdown
    from simpo_cli.run.pipeline import start_process_group

    progress.install()  # in every process that evaluates, launched ones included
    start_process_group()
    if output_dir is None:  # pairs only: one line per checkpoint, then the table of several
        scored = {c.label: {"pairs": _eval_pairs(c, settings, pairs_output)} for c in checkpoints}
        if len(checkpoints) > 1:
            say(markdown_table(*comparison_rows(scored)).rstrip())
        shutdown()
        return
    result = evaluate_checkpoints(checkpoints, settings, output_dir, settings.reference)
    if pairs_output is not None and settings.pairs is not None:
        _copy_pairs(output_dir, checkpoints[0].label, pairs_output)

    say(markdown_table(*comparison_rows(result["checkpoints"])).rstrip())
    for path in result["files"]:
        say(f"wrote {path}")
    shutdown()


def _eval_pairs(checkpoint, settings, output: str | None) -> dict:
    """One checkpoint's pairs, printed on one line that names it (and written to `output`);
    returns their summary."""
    from simpo_cli.distributed import say
    from simpo_cli.evaluate.pairs import IDENTICAL, evaluate_pairs, rate
    from simpo_cli.model.load import full_model_folder, scratch_folder

    # An adapter folder is scored as its merged model, written for the while beside `output`.
    near = Path(output).parent if output else None
    named = (checkpoint.path, settings.reference)
    with (
        full_model_folder(checkpoint.path, scratch_folder("model", near)) as folder,
        full_model_folder(
            settings.reference, scratch_folder("reference", near)
        ) as reference_folder,
    ):
        result = evaluate_pairs(folder, settings, output, reference_folder, named)
    s = result["summary"]
    line = (
        f"{checkpoint.label} ({checkpoint.path}): pairs {s['pairs']}: reward accuracy "
        f"{rate(s['reward_accuracy'])} (ties {s['reward_ties']:.4f}), mean margin "
        f"{s['reward_margin']:.4f}, SimPO loss {s['loss']:.4f} (beta {s['beta']:g}, gamma "
        f"{s['gamma']:g}; tokenization {s['tokenization']}), SFT loss (chosen NLL) "
        f"{s['sft_loss']:.4f}; Spearman(length, avg log-prob) {s['spearman_length_logp']:.4f}"
    )
    if s.get("implicit_reward_accuracy") == IDENTICAL:
        line += (
            "; DPO implicit reward: identical, every pair tied (the model scores as the reference)"
        )
    elif "implicit_reward_accuracy" in s:
        line += (
            f"; DPO implicit reward accuracy {s['implicit_reward_accuracy']:.4f} (ties "
            f"{s['implicit_reward_ties']:.4f}), disagrees with the likelihood on "
            f"{s['implicit_likelihood_disagreement']:.1%} of the pairs both rank"
        )
    say(line)
    if output:
        say(f"wrote {output}")
    return s


def _copy_pairs(output_dir: Path, label: str, output: str) -> None:
    from simpo_cli.distributed import is_main_process

    if is_main_process():
        source = output_dir / "checkpoints" / label / "pairs.json"
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(source.read_text())


def _launch_eval(launch_settings, child_args: list[str]) -> int:
    """Re-run `simpo eval` on every process through `accelerate launch`; wait for them."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    launch.preflight(launch_settings, gpus)
    command = launch.accelerate_command(launch_settings, "no", child_args)

    os.environ[LAUNCH_ID] = uuid.uuid4().hex  # one scratch folder name for every process
    print("launching: " + shlex.join(command), flush=True)
    if gpus == 0:
        print(f"no GPU here: running {launch_settings.world_size} processes on the CPU", flush=True)
    return launch.run(command)
