"""The paper's shipped recipes carry the paper's numbers; `simpo recipes list/show/copy`.

Every expected number below is copied from shared/reference/simpo.md section 2 ("The published
training recipes"), not from the recipe files, so a typo in a recipe fails here. That every
shipped recipe validates is tests/test_recipe.py's test.
"""

import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import jinja2
import pytest
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment
from typer.testing import CliRunner

from simpo_cli.cli import app
from simpo_cli.recipe import RECIPES_DIR, load_recipe, shipped_recipes, slice_bounds
from simpo_cli.run.instances import instances

# name: (beta, gamma_beta_ratio, gamma, lr, max_length, max_prompt_length, model, dataset,
#        train split, eval split): the table of section 2, one row per setting.
SIMPO = {
    "mistral-base-simpo": (
        2.0, 0.8, 1.6, 3e-7, 1024, 512, "alignment-handbook/zephyr-7b-sft-full",
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs",
    ),
    "mistral-instruct-simpo": (
        2.5, 0.1, 0.25, 5e-7, 2048, 1800, "mistralai/Mistral-7B-Instruct-v0.2",
        "princeton-nlp/mistral-instruct-ultrafeedback", "train", "test",
    ),
    "llama3-base-simpo": (
        2.0, 0.5, 1.0, 6e-7, 2048, 1800, "princeton-nlp/Llama-3-Base-8B-SFT",
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs",
    ),
    "llama3-instruct-simpo": (
        2.5, 0.55, 1.375, 1e-6, 2048, 1800, "meta-llama/Meta-Llama-3-8B-Instruct",
        "princeton-nlp/llama3-ultrafeedback", "train", "test",
    ),
    "llama3-instruct-v0.2-simpo": (
        10.0, 0.3, 3.0, 1e-6, 2048, 1800, "meta-llama/Meta-Llama-3-8B-Instruct",
        "princeton-nlp/llama3-ultrafeedback-armorm", "train", "test",
    ),
    "gemma2-9b-it-simpo": (
        10.0, 0.5, 5.0, 8e-7, 2048, 1800, "google/gemma-2-9b-it",
        "princeton-nlp/gemma2-ultrafeedback-armorm", "train", "test",
    ),
}  # fmt: skip

# The tuned DPO baselines: beta 0.01 everywhere, lr 5e-7 (Llama3-Instruct 7e-7, v0.2 3e-7); the
# notes give no Gemma-2 DPO rate (5e-7 is our choice). Model, data and lengths: the setting's row.
DPO_LR = {
    "mistral-base-dpo": 5e-7,
    "mistral-instruct-dpo": 5e-7,
    "llama3-base-dpo": 5e-7,
    "llama3-instruct-dpo": 7e-7,
    "llama3-instruct-v0.2-dpo": 3e-7,
    "gemma2-9b-it-dpo": 5e-7,
}
SFT = "llama3-base-sft"
PAPER = [*SIMPO, *DPO_LR, SFT]

# Shared by every recipe of section 2 (and taken for the SFT recipe too).
SHARED_TRAINING = {
    "total_batch_size": 128,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "optim": "adamw_torch",
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "bf16": True,
    "fp16": False,
    "gradient_checkpointing": True,
    "seed": 42,
}
GEMMA_TEMPLATE = RECIPES_DIR / "gemma2-9b-it-simpo" / "chat_template.jinja"
LLAMA3_TEMPLATE = RECIPES_DIR / SFT / "chat_template.jinja"

runner = CliRunner()


def cli(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def simpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *args], capture_output=True, text=True
    )


def shown(name: str) -> dict:
    """`simpo config show NAME`, parsed."""
    return yaml.safe_load(cli("config", "show", name))


def test_every_paper_recipe_ships():
    assert set(PAPER) <= set(shipped_recipes())


# --------------------------------------------------------------------------- the paper's numbers


@pytest.mark.parametrize("name", SIMPO)
def test_simpo_recipes_show_the_papers_numbers(name):
    beta, ratio, gamma, lr, max_length, max_prompt, model, dataset, train, test = SIMPO[name]
    text = cli("config", "show", name)
    recipe = yaml.safe_load(text)
    stage = recipe["preference"]
    assert recipe["pipeline"] == ["preference"]
    assert recipe["model"]["name_or_path"] == model
    assert stage["loss"] == "simpo"
    assert (stage["beta"], stage["gamma_beta_ratio"]) == (beta, ratio)
    assert "gamma" not in stage, "the margin is given as the authors' gamma/beta ratio"
    assert stage["training"]["learning_rate"] == pytest.approx(lr, rel=1e-12)
    assert (stage["data"]["max_length"], stage["data"]["max_prompt_length"]) == (
        max_length,
        max_prompt,
    )
    assert stage["data"]["train"] == {"path": dataset, "split": train}
    assert stage["data"]["eval"] == {"path": dataset, "split": test}
    assert (stage["loss_type"], stage["label_smoothing"], stage["sft_weight"]) == ("sigmoid", 0, 0)
    # The margin the code resolves (beta x gamma/beta) is the table's gamma column, shown by
    # `config show` and used by training (Llama3-Instruct: 1.375).
    assert f"# resolved gamma = {gamma:g}\n" in text
    assert load_recipe(name).preference.resolved_gamma == pytest.approx(gamma)


def test_llama3_instruct_margin_is_1_375():
    assert load_recipe("llama3-instruct-simpo").preference.resolved_gamma == pytest.approx(1.375)


@pytest.mark.parametrize("name", DPO_LR)
def test_dpo_recipes_show_the_tuned_baseline(name):
    beta, ratio, gamma, lr, max_length, max_prompt, model, dataset, train, test = SIMPO[
        name.replace("-dpo", "-simpo")
    ]
    recipe = shown(name)
    stage = recipe["preference"]
    assert recipe["pipeline"] == ["preference"]
    assert recipe["model"]["name_or_path"] == model
    assert (stage["loss"], stage["beta"], stage["label_smoothing"]) == ("dpo", 0.01, 0.0)
    assert stage["reference"] == {"mode": "cached"}  # the reference is the start model
    assert stage["training"]["learning_rate"] == pytest.approx(DPO_LR[name], rel=1e-12)
    assert stage["data"]["train"] == {"path": dataset, "split": train}
    assert stage["data"]["eval"] == {"path": dataset, "split": test}
    assert (stage["data"]["max_length"], stage["data"]["max_prompt_length"]) == (
        max_length,
        max_prompt,
    )
    assert not {"gamma_beta_ratio", "gamma", "sft_weight"} & set(stage)


def test_sft_recipe_shows_the_llama3_base_sft_stage():
    recipe = shown(SFT)
    assert recipe["pipeline"] == ["sft"] and "preference" not in recipe
    assert recipe["model"]["name_or_path"] == "meta-llama/Meta-Llama-3-8B"
    stage = recipe["sft"]
    assert stage["data"]["train"] == {"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}
    assert stage["data"]["eval"] == {"path": "HuggingFaceH4/ultrachat_200k", "split": "test_sft"}
    assert stage["data"]["max_length"] == 2048
    assert stage["training"]["learning_rate"] == pytest.approx(2e-5, rel=1e-12)


@pytest.mark.parametrize("name", PAPER)
def test_shared_settings_batch_and_launch(name):
    recipe = load_recipe(name)
    stage_name = recipe.pipeline[0]
    training = recipe.stage(stage_name).training
    assert {key: getattr(training, key) for key in SHARED_TRAINING} == SHARED_TRAINING
    assert (recipe.launch.num_processes, recipe.launch.num_machines) == (8, 1)
    assert recipe.launch.deepspeed == "zero3"  # ZeRO-3 without offload
    assert recipe.model.dtype == "bfloat16"
    # 128 pairs per optimizer step on 8 GPUs: the per-GPU batch times the derived accumulation.
    per_device = 4 if name == SFT else 2
    assert training.per_device_train_batch_size == per_device
    assert recipe.accumulation_steps(stage_name) == 128 // (8 * per_device)
    assert recipe.total_batch(stage_name) == 128
    # Hub datasets stay hub names (a file of that name beside the recipe would shadow them).
    assert not Path(recipe.stage(stage_name).data.train.path).is_absolute()


@pytest.mark.parametrize("name", PAPER)
def test_attention_and_chat_template(name):
    model = load_recipe(name).model
    if name.startswith("gemma2"):
        # Gemma-2's logit soft-capping needs eager attention; one template file for both recipes.
        assert model.attn_implementation == "eager"
        assert Path(model.chat_template) == GEMMA_TEMPLATE.resolve()
    else:
        assert model.attn_implementation == "flash_attention_2"
        expected = str(LLAMA3_TEMPLATE.resolve()) if name == SFT else None
        assert model.chat_template == expected


def _numbers_not_in(header: str, recipe: dict) -> list[str]:
    """The recipe's numbers ("key value") that its header does not mention in any spelling."""
    return [
        f"{key} {value}"
        for key, value in _numbers(recipe)
        if not any(
            re.search(rf"\b{key} {re.escape(spelling)}(?![\d]|\.\d)", header)
            for spelling in _number_spellings(value)
        )
    ]


def _number_spellings(value: float) -> set[str]:
    text = f"{value:g}"
    return {str(value), text, re.sub(r"e([-+])0*(\d)", r"e\1\2", text).replace("e+", "e")}


def _numbers(raw: dict, path: tuple[str, ...] = ()):
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _numbers(value, (*path, key))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


@pytest.mark.parametrize("name", PAPER)
def test_header_says_where_every_number_comes_from(name):
    text = (RECIPES_DIR / name / "recipe.yaml").read_text()
    header = " ".join(
        line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")
    )
    assert text.startswith(f"# {name}: ")
    for source in ("NeurIPS 2024", "arXiv 2405.14734", "princeton-nlp/SimPO training_configs/"):
        assert source in header
    assert "Both for " in header  # the paper setting the numbers belong to
    missing = _numbers_not_in(header, yaml.safe_load(text))
    assert not missing, f"numbers the header does not mention: {missing}"
    if name in DPO_LR:
        assert "(unverified)" in header  # the DPO search grid is marked so in the notes
    if name == "gemma2-9b-it-dpo":
        assert re.search(r"learning_rate 5e-7: \[ours\]", header)
    if name == "mistral-base-simpo":
        assert "zephyr" in header.lower() and "SFT" in header


# --------------------------------------------------------------------------- Gemma-2 template


def _raise(message: str):
    raise jinja2.TemplateError(message)


ENVIRONMENTS = {
    "plain": jinja2.Environment(),
    # What transformers renders chat templates with.
    "transformers-like": ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True),
}


def render(path: Path, env: str, messages: list[dict], bos: str, generation: bool = False) -> str:
    environment = ENVIRONMENTS[env]
    environment.globals["raise_exception"] = _raise
    template = environment.from_string(path.read_text())
    return template.render(messages=messages, bos_token=bos, add_generation_prompt=generation)


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Sort: 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
    {"role": "user", "content": "Again: 2 1"},
    {"role": "assistant", "content": "1 2"},
]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_gemma_template_folds_the_system_message_into_the_first_user_turn(env):
    assert render(GEMMA_TEMPLATE, env, CHAT, "<bos>") == (
        "<bos><start_of_turn>user\nYou are terse.\n\nSort: 3 1 2<end_of_turn>\n"
        "<start_of_turn>model\n1 2 3<end_of_turn>\n"
        "<start_of_turn>user\nAgain: 2 1<end_of_turn>\n"
        "<start_of_turn>model\n1 2<end_of_turn>\n"
    )
    assert render(GEMMA_TEMPLATE, env, CHAT[1:2], "<bos>", generation=True) == (
        "<bos><start_of_turn>user\nSort: 3 1 2<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
@pytest.mark.parametrize("template", [GEMMA_TEMPLATE, LLAMA3_TEMPLATE], ids=["gemma2", "llama3"])
def test_templates_render_each_prompt_as_a_prefix_of_its_continuation(env, template):
    # What simpo's tokenization needs: prompt (with the generation prompt) + reply = the whole.
    for messages in (CHAT, CHAT[1:]):
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = render(template, env, messages[:i], "<bos>", generation=True)
                whole = render(template, env, messages[: i + 1], "<bos>")
                assert whole.startswith(prompt) and whole.count("<bos>") == 1
                assert whole[len(prompt) :].startswith(message["content"])


@pytest.mark.parametrize(
    "messages",
    [[CHAT[2], CHAT[2]], [CHAT[1], CHAT[1]], [CHAT[1], CHAT[0]]],
    ids=["two-replies", "two-users", "late-system"],
)
def test_gemma_template_rejects_turns_gemma_cannot_hold(messages):
    with pytest.raises(jinja2.TemplateError, match="alternate user/assistant"):
        render(GEMMA_TEMPLATE, "plain", messages, "<bos>")


def test_gemma_template_renders_a_reply_alone():
    """The authors' tokenization renders each reply on its own (header on the response side)."""
    assert render(GEMMA_TEMPLATE, "plain", [CHAT[2]], "<bos>") == (
        "<bos><start_of_turn>model\n1 2 3<end_of_turn>\n"
    )


def test_llama3_sft_template_is_the_instruct_turn_format():
    assert render(LLAMA3_TEMPLATE, "plain", CHAT[:3], "<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSort: 3 1 2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n1 2 3<|eot_id|>"
    )


def test_recipe_files_are_package_data():
    """`simpo train gemma2-9b-it-simpo` after `pip install` needs every file of the recipe folders
    in the wheel: pyproject's package-data patterns must match them (glob: * stays in a folder)."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((RECIPES_DIR.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["simpo_cli.recipes"]

    def matches(relative: str, pattern: str) -> bool:
        parts, globs = relative.split("/"), pattern.split("/")
        return len(parts) == len(globs) and all(map(fnmatch, parts, globs))

    files = [
        path.relative_to(RECIPES_DIR).as_posix()
        for path in RECIPES_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".py"
    ]
    unshipped = [f for f in files if not any(matches(f, p) for p in patterns)]
    assert not unshipped, f"not in pyproject's package-data for simpo_cli.recipes: {unshipped}"


# --------------------------------------------------------------------------- simpo recipes ...


def test_recipes_list_does_not_import_torch():
    code = (
        "import sys\n"
        "from simpo_cli.cli import app\n"
        "try:\n"
        "    app(['recipes', 'list'])\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), f'recipes list exited {done.code!r}'\n"
        "assert 'torch' not in sys.modules, 'recipes list imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert result.stdout.split()[:4] == ["NAME", "MODEL", "METHOD", "HYPERPARAMETERS"]
    assert set(rows) == set(shipped_recipes())
    assert rows["llama3-instruct-simpo"].split()[1:] == [
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "simpo",
        "beta=2.5",
        "gamma/beta=0.55",
        "lr=1e-06",
    ]
    assert rows["llama3-instruct-dpo"].split()[2:] == ["dpo", "beta=0.01", "ref=cached", "lr=7e-07"]
    assert rows["gemma2-9b-it-simpo"].split()[2:] == [
        "simpo",
        "beta=10",
        "gamma/beta=0.5",
        "lr=8e-07",
    ]
    assert rows[SFT].split()[1:] == ["meta-llama/Meta-Llama-3-8B", "sft", "lr=2e-05"]
    assert rows["tiny"].split()[1:] == [
        "from_config", "(llama)", "sft", "->", "simpo", "->", "evaluate",
        "lr=0.003;", "beta=2", "gamma/beta=0.5", "sft_weight=1", "lr=0.001",
    ]  # fmt: skip
    assert rows["llama3-instruct-simpo-qlora"].split()[2:] == [
        "simpo", "beta=2.5", "gamma/beta=0.55", "lr=5e-06;", "lora", "r=128", "4bit",
    ]  # fmt: skip
    # The reward file beside tiny-onpolicy's recipe as the shipped layout has it, not as this
    # machine's absolute path.
    assert "reward=tiny-onpolicy/reward.py:sorted_digits;" in rows["tiny-onpolicy"].split()
    assert str(RECIPES_DIR) not in result.stdout


@pytest.mark.parametrize("name", ["tiny", "llama3-instruct-simpo", "gemma2-9b-it-dpo"])
def test_recipes_show_prints_the_file_as_written(name):
    assert cli("recipes", "show", name) == (RECIPES_DIR / name / "recipe.yaml").read_text()


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        (["recipes", "show", "llama3-instruct-simp"], "did you mean 'llama3-instruct-simpo'?"),
        (["recipes", "copy", "gemma2-simpo", "x"], "did you mean 'gemma2-9b-it-simpo'?"),
        (["recipes", "show", "zzzz"], "`simpo recipes list` shows them"),
    ],
)
def test_recipes_unknown_name_is_one_line(command, hint, tmp_path):
    result = simpo(*command)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {command[2]}: no shipped recipe of that name; ")
    assert hint in result.stderr


def test_recipes_copy_writes_an_editable_recipe(tmp_path):
    dest = tmp_path / "mine"
    out = cli("recipes", "copy", "tiny", str(dest))
    source_files = sorted(
        p.relative_to(RECIPES_DIR / "tiny")
        for p in (RECIPES_DIR / "tiny").rglob("*")
        if p.is_file()
    )
    assert sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file()) == source_files
    for relative in source_files:
        assert (dest / relative).read_bytes() == (RECIPES_DIR / "tiny" / relative).read_bytes()
        assert f"wrote {dest / relative}\n" in out
    recipe = load_recipe(str(dest))
    assert recipe.name == "mine"
    assert recipe.preference.data.train.path == str((dest / "data/pref_train.jsonl").resolve())


def test_recipes_copy_brings_the_shared_gemma_template_along(tmp_path):
    dest = tmp_path / "gemma-dpo"
    out = cli("recipes", "copy", "gemma2-9b-it-dpo", str(dest))
    assert sorted(p.name for p in dest.iterdir()) == ["chat_template.jinja", "recipe.yaml"]
    assert (dest / "chat_template.jinja").read_text() == GEMMA_TEMPLATE.read_text()
    assert "(from ../gemma2-9b-it-simpo/chat_template.jinja; recipe.yaml points at it)" in out
    copied = load_recipe(str(dest))
    assert copied.model.chat_template == str((dest / "chat_template.jinja").resolve())
    shipped = load_recipe("gemma2-9b-it-dpo")
    assert copied.preference == shipped.preference
    # Only the template line changed; the header comments are as shipped.
    changed = [
        (a, b)
        for a, b in zip(
            (RECIPES_DIR / "gemma2-9b-it-dpo" / "recipe.yaml").read_text().splitlines(),
            (dest / "recipe.yaml").read_text().splitlines(),
            strict=True,
        )
        if a != b
    ]
    assert changed == [
        (
            "  chat_template: ../gemma2-9b-it-simpo/chat_template.jinja",
            "  chat_template: chat_template.jinja",
        )
    ]


def test_recipes_copy_refuses_to_overwrite_and_writes_nothing(tmp_path):
    dest = tmp_path / "mine"
    (dest / "tokenizer").mkdir(parents=True)
    (dest / "tokenizer" / "tokenizer.json").write_text("my own")
    result = simpo("recipes", "copy", "tiny", str(dest))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {dest / 'tokenizer' / 'tokenizer.json'}: already exists; nothing was copied "
        "(choose a new folder or remove it)\n"
    )
    assert [p.name for p in dest.rglob("*")] == ["tokenizer", "tokenizer.json"]
    assert (dest / "tokenizer" / "tokenizer.json").read_text() == "my own"
    # A second copy of a finished copy is refused the same way.
    cli("recipes", "copy", "llama3-base-sft", str(tmp_path / "sft"))
    again = simpo("recipes", "copy", "llama3-base-sft", str(tmp_path / "sft"))
    assert again.returncode == 2 and "already exists; nothing was copied" in again.stderr


def test_recipes_help():
    for command in (["recipes"], ["recipes", "list"], ["recipes", "show"], ["recipes", "copy"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.stdout, command


# --------------------------------------------------------------------------- iterative Gemma-2

ITERATIVE = "gemma2-9b-it-simpo-iterative"


def test_the_iterative_gemma_recipe_is_the_onpolicy_recipe_in_three_rounds_on_thirds():
    recipe = load_recipe(ITERATIVE)
    single = load_recipe("gemma2-9b-it-simpo-onpolicy").dump()
    rounds = recipe.rounds
    assert (rounds.count, rounds.prompts, rounds.overrides) == (3, "split", [])
    assert recipe.pipeline == ["generate", "annotate", "preference"]
    # each round samples, scores and trains as the single-round recipe does
    for r in (1, 2, 3):
        seen = recipe.round_recipe(r).dump()
        for key in ("model", "generate", "annotate", "preference", "launch"):
            assert seen[key] == single[key], (r, key)
    # one third of the prompts a round, disjoint, covering them all (UltraFeedback's train_prefs
    # holds about 61.5k prompts; any count splits so)
    generates = [i for i in instances(recipe, Path("out")) if i.kind == "generate"]
    assert [i.prompt_split for i in generates] == [(1, 3), (2, 3), (3, 3)]
    for prompts in (61_135, 61_136, 61_137):
        bounds = [slice_bounds(prompts, 3, r) for r in (1, 2, 3)]
        assert [i for start, stop in bounds for i in range(start, stop)] == list(range(prompts))
    # every number of the file is sourced in its header, SPPO's schedule among the sources
    text = (RECIPES_DIR / ITERATIVE / "recipe.yaml").read_text()
    lines = [line for line in text.splitlines() if line.startswith("#")]
    header = " ".join(line.lstrip("#").strip() for line in lines)
    assert text.startswith(f"# {ITERATIVE}: ")
    for source in ("uclaml/SPPO", "onpolicy.md section 7", "arXiv 2405.14734"):
        assert source in header
    missing = _numbers_not_in(header, yaml.safe_load(text))
    assert not missing, f"numbers the header does not mention: {missing}"


def test_the_iterative_gemma_recipe_dry_runs_offline_with_three_rounds(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", ITERATIVE, "-o", str(out), "--dry-run")
    assert result.code == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout
    starts = ["the recipe's model (google/gemma-2-9b-it)", "round-1/preference",
              "round-2/preference"]  # fmt: skip
    for r, start in enumerate(starts, start=1):
        assert (
            f"  round {r} of 3: starts from {start}; prompts: slice {r} of 3 of generate.prompts"
        ) in text
        for kind in ("generate", "annotate", "preference"):
            assert f"  round-{r}/{kind} -> {out / f'round-{r}' / kind} (starts fresh)" in text
    assert "round 4" not in text and not out.exists()
