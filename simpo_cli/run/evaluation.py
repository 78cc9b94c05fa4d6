"""What `simpo eval` does once its flags are settings: check the paths, name the checkpoints,
then evaluate them here (one checkpoint's pairs: one printed line; else the comparison in
--output-dir) or re-launch the command through `accelerate launch`.

Loads torch only when it evaluates or launches: the path checks come first, without it.
"""

from __future__ import annotations

import os
import shlex
import sys
import uuid
from pathlib import Path

from simpo_cli import launch
from simpo_cli.errors import UserError
from simpo_cli.evaluate.compare import comparison_rows, markdown_table
from simpo_cli.launch import LAUNCH_ID
from simpo_cli.recipe import EvaluateStage, LaunchSettings
from simpo_cli.run.paths import check_evaluate_paths


def evaluate_models(
    models: list[str],
    settings: EvaluateStage,
    launch_settings: LaunchSettings,
    output: str | None,
    output_dir: Path | None,
    model_id: str | None,
    child_args: list[str],
) -> None:
    """Evaluate `models` as `simpo eval` does; `child_args`: the command for launched
    processes."""
    check_evaluate_paths(models, settings, output, output_dir)
    from simpo_cli.evaluate.checkpoints import evaluate_checkpoints, resolve_checkpoints

    checkpoints = resolve_checkpoints(models, model_id)  # a run folder: each stage's model
    single = len(checkpoints) == 1
    if output is not None and not single:
        raise UserError("--output: writes one checkpoint's pairs; use --output-dir for several")
    if output_dir is None and not (single and not settings.benchmarks and settings.lm_eval is None):
        raise UserError(
            "simpo eval: give --output-dir DIR: where the answer files and the comparison table go"
        )
    if launch.needs_launch(launch_settings) and not launch.inside_launch():
        sys.exit(_launch_eval(launch_settings, child_args))
    from simpo_cli.distributed import say, shutdown
    from simpo_cli.run.pipeline import start_process_group

    start_process_group()
    if output_dir is None:  # one checkpoint's pairs: one line
        _eval_pairs(checkpoints[0].path, settings, output)
        shutdown()
        return
    assert output_dir is not None
    result = evaluate_checkpoints(checkpoints, settings, output_dir, settings.reference)
    if output is not None and settings.pairs is not None:
        _copy_pairs(output_dir, checkpoints[0].label, output)

    say(markdown_table(*comparison_rows(result["checkpoints"])).rstrip())
    for path in result["files"]:
        say(f"wrote {path}")
    shutdown()


def _eval_pairs(model_dir: str, settings, output: str | None) -> None:
    """One checkpoint's pairs, printed on one line (and written to --output)."""
    from simpo_cli.distributed import say
    from simpo_cli.evaluate.pairs import IDENTICAL, evaluate_pairs, rate
    from simpo_cli.model.load import full_model_folder, scratch_folder

    # An adapter folder is scored as its merged model, written for the while beside --output.
    near = Path(output).parent if output else None
    named = (model_dir, settings.reference)
    with (
        full_model_folder(model_dir, scratch_folder("model", near)) as folder,
        full_model_folder(settings.reference, scratch_folder("reference", near)) as reference,
    ):
        result = evaluate_pairs(folder, settings, output, reference, named)
    s = result["summary"]
    line = (
        f"pairs {s['pairs']}: reward accuracy {rate(s['reward_accuracy'])} (ties "
        f"{s['reward_ties']:.4f}), mean margin {s['reward_margin']:.4f}, SimPO loss "
        f"{s['loss']:.4f} (beta {s['beta']:g}, gamma {s['gamma']:g}; tokenization "
        f"{s['tokenization']}), SFT loss (chosen NLL) {s['sft_loss']:.4f}; Spearman(length, "
        f"avg log-prob) {s['spearman_length_logp']:.4f}"
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
