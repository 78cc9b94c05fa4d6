"""`--dry-run`: what a run would do, printed without starting it: the resolved recipe, the exact
launch command, the batch arithmetic, optimizer steps, and per-GPU memory for model states."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path

from simpo_cli import launch
from simpo_cli.data.rows import check_rows
from simpo_cli.errors import DataError, UserError
from simpo_cli.model.adapters import writes_merged
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import (
    TRAINING_STAGES,
    DataSource,
    Recipe,
    StageName,
    expand_override,
    key_paths,
    slice_bounds,
    split_problem,
    stage_identity,
)
from simpo_cli.redact import redact, redact_args
from simpo_cli.run import hub
from simpo_cli.run.instances import StageInstance, model_label, reference_text, round_start


def print_plan(
    recipe: Recipe,
    plan: list[StageInstance],
    out: Path,
    child: list[str] | None,
    overwrite: bool = False,
) -> None:
    print(recipe.to_yaml().rstrip())
    lines = ["", "launch:"]
    settings = recipe.launch
    ds = launch.read_deepspeed_config(settings.deepspeed) if settings.deepspeed else None
    zero = (ds or {}).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = _offloads(zero)
    lines.append(
        f"  {settings.num_processes} process(es) per machine x {settings.num_machines} "
        f"machine(s) = {settings.world_size}; "
        + (f"DeepSpeed {settings.deepspeed} (ZeRO-{stage})" if ds else "no DeepSpeed")
    )
    if child is None:
        lines.append("  runs in this process (no launcher)")
    else:
        command = launch.launch_command(recipe, child)
        if settings.num_machines > 1:
            lines.append("  run on every machine, with --machine_rank set to that machine's rank:")
        lines.append("  " + shlex.join(redact_args(command)))

    lines += ["", "stages:"]
    shown = None
    for instance in plan:
        if instance.round is not None and instance.round != shown:
            lines.append(_round_line(instance))
        shown = instance.round
        lines += stage_lines(instance, out, overwrite)
    unused = _unused_overrides(recipe)
    if unused:
        lines.append(f"  note: {unused}")
    names = list(dict.fromkeys(instance.kind for instance in plan))
    lines += ["", *_memory_lines(recipe, names, stage, offload)]
    pushes = hub.plan_lines(recipe, out)
    if pushes:
        lines += ["", "hub (pushed at the end of the command, once finished):"]
        lines += [f"  {line}" for line in pushes]
    print("\n".join(lines))


def _offloads(zero: dict) -> bool:
    return any(
        (zero.get(key) or {}).get("device", "none") not in ("none", None)
        for key in ("offload_param", "offload_optimizer")
    )


def _round_line(instance: StageInstance) -> str:
    """The head of a round in the plan: which model it starts from, its prompts, its reference."""
    recipe = instance.recipe
    rounds = recipe.rounds
    assert rounds is not None and instance.round is not None
    start = model_label(recipe, round_start(recipe, instance.round))
    entry = rounds.overrides[instance.round - 1] if instance.round <= len(rounds.overrides) else {}
    nested, _ = expand_override(entry, "")
    changed = [".".join(key) for key in key_paths(nested)]
    return (
        f"  round {instance.round} of {rounds.count}: starts from {start}; prompts: "
        f"{prompt_text(instance)}; reference: {reference_text(instance)}"
        + (f"; rounds.overrides[{instance.round - 1}]: {', '.join(changed)}" if changed else "")
    )


def prompt_text(instance: StageInstance) -> str:
    """The generate.prompts a round samples, as the plan says it (rows before duplicates are
    dropped: the split itself is made of the prompts without duplicates)."""
    source = instance.recipe.stage("generate").prompts
    rows = count_rows(source)
    split = instance.prompt_split
    if split is None:
        return "all of generate.prompts" + ("" if rows is None else f" ({rows})")
    round_, count = split
    if rows is None:
        return f"slice {round_} of {count} of generate.prompts (from the hub: sized as it runs)"
    start, stop = slice_bounds(rows, count, round_)
    return f"{start + 1}-{stop} of {rows} (slice {round_} of {count})"


def _unused_overrides(recipe: Recipe) -> str | None:
    rounds = recipe.rounds
    if rounds is None or len(rounds.overrides) <= rounds.count:
        return None
    return (
        f"rounds.overrides has {len(rounds.overrides)} entries for {rounds.count} round(s); "
        f"entries {rounds.count} to {len(rounds.overrides) - 1} are not used"
    )


def stage_lines(
    instance: StageInstance, out: Path, overwrite: bool = False, in_sweep: bool = False
) -> list[str]:
    """A stage instance in the plan: its folder and state (fresh, resumes, finished), where its
    model starts, and for a training stage its batch and optimizer steps. `in_sweep`: a sweep's
    plan, whose --overwrite reruns only folders made with other settings."""
    recipe, name = instance.recipe, instance.kind
    stage_dir = StageDir(out / instance.folder)
    checkpoint = stage_dir.last_checkpoint()
    try:
        identity = stage_identity(redact(recipe.dump()), name, instance.round)
        stage_dir.check(identity, name, instance.round)
        other_recipe = None
    except UserError as err:
        other_recipe = str(err)
    if overwrite and (stage_dir.path / "resolved_recipe.yaml").is_file():
        state = "starts over: --overwrite"
    elif other_recipe is not None:
        state = f"stops: {other_recipe}"
    elif stage_dir.is_complete():
        state = "finished, will be skipped" + ("" if in_sweep else "; --overwrite reruns it")
    elif checkpoint is not None:
        state = f"resumes from {checkpoint.name}"
    else:
        state = "starts fresh"
    section = recipe.stage(name)
    head = f"  {instance.folder} -> {stage_dir.path} ({state})"
    if name == "generate":
        prompts = count_rows(section.prompts)
        count = "prompts from the hub" if prompts is None else f"{prompts} prompts"
        if instance.round is not None:
            count = f"prompts {prompt_text(instance)}"
        return [
            head,
            *_start_lines(instance, out, "samples from"),
            f"    {count} x {len(section.sample_seeds)} samples (seeds "
            f"{list(section.sample_seeds)}), temperature {section.temperature:g}, top_p "
            f"{section.top_p:g}, max_new_tokens {section.max_new_tokens}; backend "
            f"{section.backend}, {recipe.launch.world_size} process(es)",
        ]
    if name == "annotate":
        reward = section.reward
        return [
            head,
            f"    reward {'model ' + reward.model if reward.model else reward.function}; "
            f"{section.selection}, min_margin {section.min_margin:g}, drop_truncated "
            f"{str(section.drop_truncated).lower()}; pairs into {stage_dir.path / 'dataset'}",
        ]
    if name == "evaluate":
        return [head, *_evaluate_lines(recipe)]
    t = section.training
    world = recipe.launch.world_size
    accumulation = recipe.accumulation_steps(name)
    total = recipe.total_batch(name)
    lines = [
        head,
        *_start_lines(instance, out, "start model"),
        f"    batch: {t.per_device_train_batch_size} per device x {world} process(es) x "
        f"{accumulation} accumulation step(s) = {total} per optimizer step",
    ]
    if t.balanced_batches:
        lines.append(
            "    micro-batches: the step's examples grouped by length into micro-batches of "
            "about equal tokens (balanced_batches), so their sizes vary around the per-device "
            "batch"
        )
    if name == "preference":
        lines.append(f"    gamma {section.resolved_gamma:g} (beta {section.beta:g})")
        if instance.round is not None:
            lines.append(f"    reference: {reference_text(instance)}")
    if recipe.model.lora is not None:
        lines.append(_adapter_line(recipe, name))
    rows = count_rows(section.data.train)
    if rows is None and recipe.origin((name, "data", "train")) == "annotate stage":
        lines.append(f"    data: the annotate stage's pairs ({section.data.train.path})")
        lines.append("    optimizer steps: known once the annotate stage has written the pairs")
    elif rows is None:
        lines.append("    optimizer steps: unknown until the data is read (hub dataset)")
    else:
        per_epoch, steps = planned_steps(recipe, name, rows)
        lines.append(
            f"    optimizer steps: {per_epoch} per epoch ({rows} rows, before dropped rows); "
            f"{steps} in all"
        )
    return lines


def _start_lines(instance: StageInstance, out: Path, what: str) -> list[str]:
    """Which model a round's (or a sweep point's) generate samples from, or its preference stage
    trains."""
    if instance.round is None and instance.folder == instance.kind:
        return []
    where = f" ({out / instance.model_from})" if instance.model_from is not None else ""
    return [f"    {what}: {model_label(instance.recipe, instance.model_from)}{where}"]


def planned_steps(recipe: Recipe, name: StageName, rows: int) -> tuple[int, int]:
    """(optimizer steps per epoch, in all) of a training stage on `rows` examples, as Trainer
    counts them (Trainer.set_initial_training_values: micro-batches per process, then steps of
    `accumulation` micro-batches, the last one short)."""
    t = recipe.stage(name).training
    micro_batches = math.ceil(rows / (t.per_device_train_batch_size * recipe.launch.world_size))
    per_epoch = max(math.ceil(micro_batches / recipe.accumulation_steps(name)), 1)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.num_train_epochs)
    return per_epoch, steps


def check_training(plan: list[StageInstance], out: Path, overwrite: bool) -> None:
    """Before any stage starts (and in --dry-run): one line each (UserError) for a training
    stage to run whose local data holds fewer rows than one optimizer step, or whose schedule
    gives every step learning rate 0; and for rounds that split fewer local prompts than there
    are rounds. A stage reading hub data, or pairs not written yet, is checked as it starts
    (train/schedule.py), on its tokenized data; hub prompts as the generate stage reads them."""
    from simpo_cli.train import schedule

    problems = []
    for instance in plan:
        recipe, name = instance.recipe, instance.kind
        if StageDir(out / instance.folder).is_complete() and not overwrite:
            continue  # skipped, not trained
        if name == "generate" and instance.prompt_split is not None:
            rows = count_rows(recipe.stage("generate").prompts)
            problem = None if rows is None else split_problem(rows, instance.prompt_split[1])
            if problem is not None:
                problems.append(f"generate.prompts: {rows} rows; {problem}")
        if name not in TRAINING_STAGES:
            continue
        source = recipe.stage(name).data.train
        rows = count_rows(source)
        if rows is None or _bad_rows(source, name):
            continue
        _, steps = planned_steps(recipe, name, rows)
        args = schedule.planned_arguments(recipe, name)
        counted = f"{source.path}, rows before dropped rows"
        problem = schedule.schedule_problem(recipe, name, args, rows, steps, counted)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise UserError(list(dict.fromkeys(problems)))


def _bad_rows(source: DataSource, name: StageName) -> bool:
    """Whether the rows of a local file are ones training refuses: the stage then names the
    row (what the data is matters before how much of it there is)."""
    try:
        check_rows(source, name, f"{name}.data.train")
    except DataError:
        return True
    return False


def _adapter_line(recipe: Recipe, name: StageName) -> str:
    previous = recipe.model_stage_before(name)
    if previous is not None and recipe.model.lora.continue_adapter:
        start = f"trains {previous}'s adapter further"
    else:
        start = "fresh adapters"
    if writes_merged(recipe, name):
        return f"    LoRA: {start}; saves adapter/ and the merged model"
    return f"    LoRA: {start}; saves adapter/ only (model.lora.merge), merged as it is read"


def memory_lines(recipe: Recipe, names: list[StageName]) -> list[str]:
    """The memory estimate of the plan for the training stages among `names`, on the recipe's
    launch (its DeepSpeed config read for the ZeRO stage and offload)."""
    settings = recipe.launch
    ds = launch.read_deepspeed_config(settings.deepspeed) if settings.deepspeed else None
    zero = (ds or {}).get("zero_optimization", {})
    return _memory_lines(recipe, names, int(zero.get("stage", 0)), _offloads(zero))


def _memory_lines(recipe: Recipe, names: list[StageName], stage: int, offload: bool) -> list[str]:
    counted = launch.count_parameters(recipe)
    if counted is None:
        return ["memory: unknown (the model's config cannot be read here)"]
    n_params, largest, vocab, trainable, linear = counted
    settings = recipe.launch
    where = f"ZeRO-{stage}" + (" with CPU offload" if offload else "") if stage else "no ZeRO"
    if recipe.model.lora is None:
        estimate = launch.model_states_memory(
            n_params, largest, stage, offload, settings.num_processes, settings.num_machines
        )
        lines = [
            f"memory per GPU for model states ({where}, {settings.world_size} GPU(s)): "
            f"{_bytes(estimate.gpu_bytes)} for {_count(n_params)} parameters (largest layer "
            f"{_count(largest)}); activations not included"
        ]
    else:
        # Frozen weights in their loaded precision, whole on every GPU or (ZeRO-3) split over
        # them, on the CPU with offload; gradients and Adam for the adapters only.
        estimate = launch.model_states_memory(
            trainable, largest, stage, offload, settings.num_processes, settings.num_machines
        )
        quantized = recipe.model.quantization
        per_weight = 4 if recipe.model.dtype == "float32" else 2
        frozen = n_params * per_weight
        if quantized:
            # bitsandbytes quantizes the linear layers but the output head. The rest (embeddings,
            # norms, the head) peft's k-bit preparation casts to fp32. NF4 with double
            # quantization: 4 bits and about 0.127 bits of constants per weight (Dettmers et
            # al. 2023); int8: 8 bits and one fp32 scale per row (left out).
            bits = 4 + 0.127 if quantized == "4bit" else 8
            frozen = (n_params - linear) * 4 + int(linear * bits / 8)
        split = ""
        if stage == 3 and offload:
            estimate = dataclasses.replace(estimate, cpu_bytes=estimate.cpu_bytes + frozen)
            frozen, split = 0, ", on the CPU"
        elif stage == 3:
            frozen, split = frozen // settings.world_size, f", split over {settings.world_size}"
        lora = recipe.model.lora
        targets = lora.target_modules
        targets = targets if isinstance(targets, str) else ", ".join(targets)
        lines = [
            f"LoRA r={lora.r} ({targets}): {_count(trainable)} trainable adapter parameters on "
            f"{_count(n_params)} frozen ({trainable / n_params:.2%})",
            f"memory per GPU for model states ({where}, {settings.world_size} GPU(s)): "
            f"{_bytes(frozen + estimate.gpu_bytes)}: frozen weights {_bytes(frozen)} "
            f"({quantized or recipe.model.dtype}{split}), adapters with gradients and Adam"
            f"{' and the gathered layer' if stage == 3 else ''} {_bytes(estimate.gpu_bytes)}; "
            "activations not included",
        ]
        estimate = dataclasses.replace(estimate, gpu_bytes=frozen + estimate.gpu_bytes)
    if estimate.cpu_bytes:
        lines.append(f"  CPU memory per machine: {_bytes(estimate.cpu_bytes)}")
    for name in names:
        if name not in TRAINING_STAGES:
            continue
        section = recipe.stage(name)
        t = section.training
        sizes = (t.per_device_train_batch_size, section.data.max_length, vocab)
        full = launch.logits_bytes(*sizes, paired=name == "preference")
        logits = launch.logits_bytes(
            *sizes, paired=name == "preference", chunk_size=t.logps_chunk_size
        )
        layout = "packed without padding" if t.padding_free else "padded to the longest"
        if t.logps_chunk_size:
            lines.append(
                f"  {name}: fp32 logits held at once: {_bytes(logits)} (chunks of "
                f"{t.logps_chunk_size} trained tokens, vocabulary {vocab}; full logits of a "
                f"micro-batch at max_length: {_bytes(full)}); batches {layout}"
            )
        else:
            lines.append(
                f"  {name}: fp32 logits of one micro-batch at max_length: {_bytes(logits)} "
                f"(vocabulary {vocab}; logps_chunk_size 0); batches {layout}"
            )
        peak = estimate.gpu_bytes + logits
        if peak > settings.gpu_memory_gb * launch.GIB:
            lines.append(
                f"  WARNING: {name} needs about {peak / launch.GIB:.1f} GiB per GPU before "
                f"activations, more than launch.gpu_memory_gb ({settings.gpu_memory_gb:g}); use a "
                "higher ZeRO stage or offload (--deepspeed zero3 / zero3_offload), more GPUs, "
                "or a smaller per_device_train_batch_size with more accumulation"
            )
    return lines


def count_rows(source: DataSource) -> int | None:
    """Rows a local source holds (capped by max_rows), without tokenizing; None for the hub."""
    path = Path(source.path)
    if path.is_file():
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
        elif path.suffix == ".json" and path.read_text().lstrip().startswith("["):
            rows = len(json.loads(path.read_text()))
        else:
            rows = sum(1 for line in path.read_text().split("\n") if line.strip())
    elif path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[source.split] if source.split in loaded else None
        rows = len(loaded) if loaded is not None else None
    else:
        return None
    if rows is not None and source.max_rows is not None:
        rows = min(rows, source.max_rows)
    return rows


def _bytes(n: float) -> str:
    for unit, size in (("GiB", launch.GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _evaluate_lines(recipe: Recipe) -> list[str]:
    section = recipe.stage("evaluate")
    checkpoints = ", ".join(
        name if where == name or not stage else f"{name} ({where})"
        for name, where, stage in recipe.evaluate_rows()
    )
    lines = [f"    checkpoints: {checkpoints}"]
    if recipe.compares_rounds():
        source = recipe.generate.eval_prompts
        reward = recipe.annotate.reward
        scored = f"model {reward.model}" if reward.model else f"function {reward.function}"
        lines.append(
            f"    rounds: greedy answers to the held-out prompts ({source.path}) scored by "
            f"{scored}; win rates over the previous row and the first; rounds.png"
        )
    pairs = recipe.evaluate_pairs()
    if pairs is not None:
        reference = (
            f"; DPO implicit reward against {section.reference}" if section.reference else ""
        )
        lines.append(f"    pairs: {pairs.path} [{pairs.split}]{reference}")
    for bench in section.benchmarks:
        against = f"; reward-model win rate against {bench.against}" if bench.against else ""
        lines.append(
            f"    benchmark {bench.name}: {bench.questions or 'the hub eval set'}{against}"
        )
    if section.lm_eval is not None:
        lines.append(f"    lm-eval tasks: {', '.join(section.lm_eval.tasks)}")
    return lines
