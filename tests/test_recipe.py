"""The recipe schema, overrides and error messages; the read-only CLI commands."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from simpo_cli.errors import RecipeError
from simpo_cli.recipe import RECIPES_DIR, data_sources, load_recipe, shipped_recipes

MINIMAL = """
model: {name_or_path: some-org/some-model}
pipeline: [preference]
preference:
  beta: 2.5
  gamma_beta_ratio: 0.55
  data: {train: pairs.jsonl, max_length: 128, max_prompt_length: 64}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path), list(overrides))
    return info.value.messages


def simpo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.pipeline
    sources = data_sources(recipe)
    # Every stage reads data (a preference stage without any reads the annotate stage's pairs).
    assert sources or recipe.pipeline == ["generate", "annotate", "preference"]
    for source in sources:
        path = source.path
        # A shipped file resolves to an absolute path; a hub dataset name stays as written.
        assert Path(path).is_file() or not (Path(path).is_absolute() or Path(path).suffix), path
    if recipe.preference is not None and recipe.preference.data.train is None:
        assert "annotate" in recipe.pipeline


def test_shipped_recipes_include_tiny():
    assert "tiny" in shipped_recipes()
    assert (RECIPES_DIR / "tiny" / "recipe.yaml").is_file()


def test_gamma_from_ratio_is_resolved(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL)))
    assert recipe.preference.resolved_gamma == pytest.approx(2.5 * 0.55)
    assert recipe.name == "r"


def test_gamma_absolute_and_default(tmp_path):
    path = write(tmp_path, MINIMAL)
    absolute = load_recipe(str(path), ["preference.gamma_beta_ratio=null", "preference.gamma=1.6"])
    assert absolute.preference.resolved_gamma == 1.6
    default = load_recipe(str(path), ["preference.gamma_beta_ratio=null"])
    assert default.preference.resolved_gamma == pytest.approx(2.5 * 0.5)


def test_both_gamma_forms_is_one_clear_error(tmp_path):
    (line,) = errors_of(write(tmp_path, MINIMAL), ["preference.gamma=1.0"])
    assert "preference" in line and "gamma (1.0)" in line and "gamma_beta_ratio (0.55)" in line
    assert "give the margin once" in line


def test_misspelt_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, MINIMAL.replace("beta: 2.5", "betta: 2.5"))
    (line,) = errors_of(path)
    assert line == f"{path}: preference.betta: unknown key; did you mean 'beta'?"


def test_unknown_key_without_a_close_match_lists_allowed(tmp_path):
    (line,) = errors_of(write(tmp_path, MINIMAL + "zzz: 1\n"))
    assert "zzz: unknown key; allowed: name, description, output_dir, model" in line


def test_wrong_type_names_key_value_and_fix(tmp_path):
    (line,) = errors_of(write(tmp_path, MINIMAL.replace("beta: 2.5", "beta: high")))
    assert "preference.beta = 'high'" in line
    assert "give a number" in line


def test_bad_range(tmp_path):
    (line,) = errors_of(write(tmp_path, MINIMAL.replace("beta: 2.5", "beta: -1")))
    assert "preference.beta = -1: input should be greater than 0" in line


def test_bad_choice_suggests(tmp_path):
    (line,) = errors_of(write(tmp_path, MINIMAL + "  loss_type: hinj\n"))
    assert "preference.loss_type = 'hinj'" in line and "did you mean 'hinge'?" in line


def test_prompt_length_not_below_max_length(tmp_path):
    text = MINIMAL.replace("max_prompt_length: 64", "max_prompt_length: 128")
    (line,) = errors_of(write(tmp_path, text))
    assert "preference.data" in line
    assert "max_prompt_length (128) must be smaller than max_length (128)" in line


def test_all_errors_reported_at_once(tmp_path):
    text = MINIMAL.replace("beta: 2.5", "beta: -1").replace("max_length: 128", "max_lenght: 128")
    text += "logging: {report_to: wandbb}\n"
    lines = errors_of(write(tmp_path, text))
    assert len(lines) == 3
    joined = "\n".join(lines)
    assert "preference.beta = -1" in joined
    assert "preference.data.max_lenght: unknown key; did you mean 'max_length'?" in joined
    assert "logging.report_to[0] = 'wandbb'" in joined and "did you mean 'wandb'?" in joined


def test_missing_required_section(tmp_path):
    (line,) = errors_of(write(tmp_path, "model: {name_or_path: x}\npipeline: [sft]\n"))
    assert "pipeline runs 'sft' but the recipe has no sft: section" in line


def test_missing_required_key(tmp_path):
    (line,) = errors_of(write(tmp_path, MINIMAL.replace("train: pairs.jsonl, ", "")))
    assert line.endswith(
        "preference.data.train: required key is missing; add it, or run an annotate stage "
        "before preference (pipeline: [generate, annotate, preference])"
    )


def test_pipeline_order_and_unknown_stage(tmp_path):
    lines = errors_of(write(tmp_path, MINIMAL.replace("[preference]", "[preference, sfft]")))
    assert "pipeline[1] = 'sfft'" in lines[0] and "did you mean 'sft'?" in lines[0]


ONE_SAMPLE = {
    "generate.num_samples=1": "generate.num_samples: 1 gives one reply per prompt, and annotate "
    "needs two or more to make a pair; set generate.num_samples to 2 or more (the SimPO authors "
    "sample 5)",
    "generate.seeds=[7]": "generate.seeds: [7] gives one reply per prompt, and annotate needs "
    "two or more to make a pair; list two or more seeds (the SimPO authors use [13, 21, 42, 79, "
    "100])",
}


@pytest.mark.parametrize("given", ONE_SAMPLE)
def test_one_sample_per_prompt_before_annotate_is_a_recipe_error(given, tmp_path, cli):
    """annotate pairs two replies of one prompt: one sample per prompt (num_samples 1, or one
    seed) would drop every prompt after generating them all. Refused with the recipe's other
    problems, by `simpo validate`, and by `simpo train` and `simpo annotate` before anything is
    written."""
    sets = [given, *(["generate.num_samples=null"] if "seeds" in given else [])]
    recipe = str(RECIPES_DIR / "tiny-onpolicy" / "recipe.yaml")
    # With another problem (a total batch that 8 per device cannot make): both reported.
    lines = errors_of(recipe, [*sets, "preference.training.total_batch_size=12"])
    assert lines == [
        f"{recipe}: preference.training.total_batch_size: 12 is not a multiple of "
        "per_device_train_batch_size 8 x 1 processes = 8; with 1 processes, "
        "per_device_train_batch_size 1, 2, 3, 4, 6 or 12 would work",
        f"{recipe}: {ONE_SAMPLE[given]}",
    ]
    set_args = [arg for s in sets for arg in ("--set", s)]
    result = cli("validate", "tiny-onpolicy", *set_args)
    assert result.code == 2
    assert result.errors() == [f"error: {recipe}: {ONE_SAMPLE[given]}"]
    out = tmp_path / "run"
    for command in ("train", "annotate"):  # annotate alone scores what generate wrote
        result = cli(command, "tiny-onpolicy", "-o", out, *set_args)
        assert result.code == 2 and "Traceback" not in result.stderr
        assert result.errors() == [f"error: {recipe}: {ONE_SAMPLE[given]}"]
        assert not out.exists()
    # Two samples make pairs; generate alone (no annotate in the pipeline) may take one.
    load_recipe("tiny-onpolicy", ["generate.num_samples=2"])
    load_recipe("tiny-onpolicy", [*sets, "pipeline=[sft, generate]", "preference=null"])


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(str(path), ["preference.beta=10", "preference.training.bf16=true"])
    assert recipe.preference.beta == 10.0 and recipe.preference.training.bf16 is True
    (line,) = errors_of(path, ["preference.beta=abc"])
    assert line.startswith("--set preference.beta=abc: preference.beta = 'abc'")
    (line,) = errors_of(path, ["preference.bta=1"])
    assert line.startswith("--set preference.bta=1: preference.bta: unknown key")
    (line,) = errors_of(path, ["beta"])
    assert "expected KEY.PATH=VALUE" in line


def test_set_list_errors_name_the_flag_and_the_syntax_that_works(cli):
    """A list item written by --set is blamed on the flag, not the recipe file, and a list
    written without brackets or commas gets the --set that would have worked."""
    result = cli("validate", "tiny", "--set", "pipeline=[sft preference]")
    assert result.code == 2
    assert result.errors() == [
        "error: --set pipeline=[sft preference]: pipeline[0] = 'sft preference': input should "
        "be 'sft', 'generate', 'annotate', 'preference' or 'evaluate'; separate the items with "
        "commas: --set 'pipeline=[sft, preference]'"
    ]
    result = cli("validate", "tiny", "--set", "pipeline=sft")
    assert result.code == 2
    assert result.errors() == [
        "error: --set pipeline=sft: pipeline = 'sft': input should be a valid list; give a list "
        "(items comma-separated, quoted for the shell): --set 'pipeline=[sft]'"
    ]
    (line,) = errors_of("tiny", ["pipeline=[sft, prefrence]"])
    assert line.startswith("--set pipeline=[sft, prefrence]: pipeline[1] = 'prefrence'")
    assert line.endswith("did you mean 'preference'?")


def test_set_into_shorthand_data_source(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL)), ["preference.data.train.max_rows=5"])
    assert recipe.preference.data.train.max_rows == 5
    assert recipe.preference.data.train.path.endswith("pairs.jsonl")


def test_relative_paths_resolve_beside_the_recipe(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    recipe = load_recipe(str(write(tmp_path, MINIMAL)))
    assert recipe.preference.data.train.path == str((tmp_path / "pairs.jsonl").resolve())
    # A name that is not a local file stays as written: a hub model name.
    assert recipe.model.name_or_path == "some-org/some-model"


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "model: {name_or_path: x\npipeline: [sft]\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: line ") and "invalid YAML" in line


def test_unknown_recipe_lists_shipped():
    with pytest.raises(RecipeError) as info:
        load_recipe("no-such-recipe")
    assert "shipped: " in info.value.messages[0] and "tiny" in info.value.messages[0]


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL)))
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(recipe.to_yaml())
    again = load_recipe(str(dumped))
    assert again.name == recipe.name  # the dumped name wins over the file's
    assert again.preference == recipe.preference and again.model == recipe.model


# --------------------------------------------------------------------------- CLI, read-only


def test_cli_validate_exit_codes(tmp_path):
    good = write(tmp_path, MINIMAL)
    bad = write(tmp_path, MINIMAL.replace("beta: 2.5", "beta: -1"), "bad.yaml")
    missing = simpo("validate", str(good))
    assert missing.returncode == 2 and "pairs.jsonl: preference.data.train: no such" in (
        missing.stderr
    )
    pairs_file(tmp_path, [PAIR])  # beside the recipe, where its relative path is looked for
    ok = simpo("validate", str(good), "tiny")
    assert ok.returncode == 0, ok.stderr
    assert "ok: tiny" in ok.stdout
    result = simpo("validate", str(good), str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"error: {bad}: preference.beta = -1: input should be greater than 0; raise it"
    )


PAIR = {"prompt": "Sort: 3 1", "chosen": "1 3", "rejected": "3 1"}
AS_MESSAGES = {
    "chosen": [{"role": "user", "content": "Sort: 5 4"}, {"role": "assistant", "content": "4 5"}],
    "rejected": [{"role": "user", "content": "Sort: 5 4"}, {"role": "assistant", "content": "5 4"}],
}


def pairs_file(folder: Path, rows: list[dict]) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_validate_reads_the_data_as_training_does(cli, tmp_path):
    """The issue: validate said ok to rows mixing message lists and strings, which training
    then refused. It reads a JSON file's rows with training's own checks (no model): the bad
    row is named, exit 2; a row with an empty prompt is counted as dropped, as training counts
    it; a missing file is named; a hub dataset is named as not read here."""
    mixed = pairs_file(tmp_path, [PAIR, PAIR, PAIR, AS_MESSAGES])
    result = cli("validate", "tiny", "--set", f"preference.data.train={mixed}")
    assert result.code == 2 and result.stdout == ""
    assert result.errors() == [
        f"error: preference.data.train: {mixed}: line 4: 'chosen' is a list but line 1 has a "
        "string; make each column one type (e.g. chosen always a list of messages)"
    ]
    no_reply = pairs_file(tmp_path, [AS_MESSAGES, {**AS_MESSAGES, "chosen": [{"role": "user"}]}])
    result = cli("validate", "tiny", "--set", f"preference.data.train={no_reply}")
    assert result.errors() == [
        "error: preference.data.train: line 2: chosen must end with an assistant message"
    ]
    empty = pairs_file(tmp_path, [PAIR, {**PAIR, "prompt": ""}, PAIR])
    result = cli("validate", "tiny", "--set", f"preference.data.train={empty}",
                 "--set", "sft.data.eval=missing.jsonl")  # fmt: skip
    assert result.code == 2 and result.errors() == [
        "error: missing.jsonl: sft.data.eval: no such data file or folder (looked beside the "
        "recipe and in the current folder); fix the path, or give a hub dataset name (owner/name)"
    ]
    result = cli("validate", "tiny", "--set", f"preference.data.train={empty}",
                 "--set", "sft.data.eval=owner/sft-pairs")  # fmt: skip
    assert result.code == 0, result.stderr
    assert "  preference.data.train: 3 rows read; 1 dropped (empty prompt: line 2)" in (
        result.stdout.splitlines()
    )
    assert (
        "  sft.data.eval: not read here (a hub dataset: owner/sft-pairs); `simpo data inspect "
        "tiny --stage sft` reads it" in result.stdout.splitlines()
    )


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    bad = write(tmp_path, MINIMAL + "  loss_typ: hinge\n")
    for command in (["train", str(bad)], ["sft", str(bad)], ["config", "show", str(bad)]):
        result = simpo(*command)
        assert result.returncode == 2, command
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and "did you mean 'loss_type'?" in result.stderr


def test_config_show_prints_resolved_yaml_without_torch():
    code = (
        "import sys\n"
        "from simpo_cli.cli import app\n"
        "try:\n"
        "    app(['config', 'show', 'tiny', '--set', 'preference.beta=3'])\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), f'config show exited {done.code!r}'\n"
        "assert 'torch' not in sys.modules, 'config show imported torch'\n"
        "app(['validate', 'tiny'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'validate imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("name: tiny\n")
    assert result.stdout.endswith(
        "# resolved gamma = 1.5\nok: tiny (tiny: sft -> preference -> evaluate)\n"
        "  sft.data.train: 3000 rows read\n  sft.data.eval: 200 rows read\n"
        "  preference.data.train: 1500 rows read\n  preference.data.eval: 300 rows read\n"
    )
    shown = yaml.safe_load(result.stdout.split("ok: tiny")[0])
    assert shown["preference"]["beta"] == 3.0
    assert shown["preference"]["training"]["warmup_ratio"] == 0.1  # a default, filled in


def test_help_shows_no_type_beside_a_flag(cli):
    """typer wrote `<bool>` beside every flag (--dry-run, --help) and `<list[str]>` beside a
    repeatable option or argument: flags show none, repeatable ones their item's type."""
    for command in (["train"], ["validate"], ["eval"]):
        result = cli(*command, "--help")
        assert result.code == 0, result.stderr
        assert "<bool>" not in result.stdout and "<list[" not in result.stdout, result.stdout
        set_line = next(line for line in result.stdout.splitlines() if "--set" in line or (
            "models..." in line))  # fmt: skip
        assert "<str>" in set_line, set_line


def test_help_on_every_command():
    for command in (
        [],
        ["train"],
        ["sft"],
        ["preference"],
        ["validate"],
        ["config", "show"],
        ["data", "inspect"],
        ["eval"],
        ["plot"],
        ["recipes", "list"],
        ["recipes", "show"],
        ["recipes", "copy"],
        ["env"],
    ):
        result = simpo(*command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage:" in result.stdout


def test_settings_table_says_where_each_value_came_from(tmp_path):
    from simpo_cli.recipe import settings_table

    recipe = load_recipe(str(write(tmp_path, MINIMAL)), ["preference.training.seed=7"])
    table = settings_table(recipe, "preference")
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert rows["preference.beta"] == ["2.5", "recipe"]
    assert rows["preference.training.seed"] == ["7", "--set"]
    assert rows["preference.gamma"] == ["(resolved)", "1.375", "beta", "x", "gamma_beta_ratio"]
    # The settings at their defaults are counted, not listed (the table was 30 lines a stage).
    assert "preference.training.learning_rate" not in rows
    assert all(row[-1] != "default" for row in rows.values())
    assert table[-1] == (
        "  (30 more at their defaults: --all-settings prints them; resolved_recipe.yaml holds "
        "them all)"
    )
    every = load_recipe(str(write(tmp_path, MINIMAL)), ["logging.all_settings=true"])
    rows = {line.split()[0]: line.split()[1:] for line in settings_table(every, "preference")}
    assert rows["preference.training.learning_rate"] == ["1e-06", "default"]
    assert len(rows) == len(table) - 1 + 30


def test_settings_table_origin_of_a_data_source_written_as_a_mapping():
    """`train: {path, max_rows}` shows as one value: from the recipe, or --set when one of its
    keys was overridden."""
    from simpo_cli.recipe import settings_table

    def origin(sets: list[str]) -> str:  # tiny's preference.data.train is {path, max_rows}
        table = settings_table(load_recipe("tiny", sets), "preference")
        key = "preference.data.train"
        return next(line.split()[-1] for line in table if line.split()[0] == key)

    assert origin([]) == "recipe"
    assert origin(["preference.data.train.max_rows=10"]) == "--set"
