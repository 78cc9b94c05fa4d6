"""Model cards (README.md in every model folder a stage writes) and pushes to the Hugging Face Hub
(the recipe's `hub:` section).

No test reaches the network: pushes stop at huggingface_hub's API boundary. HfApi's methods are
replaced by fakes that record each call and copy what upload_folder would send (the folder's
files through huggingface_hub's own filter of the ignore patterns), so the tests read what would
land on the hub: the files, the card, the private flag, the revision."""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import httpx2
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from simpo_cli.recipe import RECIPES_DIR, load_recipe
from simpo_cli.run.card import write_cards

ROOT = Path(__file__).resolve().parent.parent
HF_TOKEN = "hf_PlantedHubToken0123456789"
CITATION_TITLE = "{SimPO}: Simple Preference Optimization with a Reference-Free Reward"

# The tiny pipeline with LoRA, shortened (tests/test_lora.py's run): SFT writes its adapter only,
# the preference stage its adapter and the merged model, the evaluate stage scores both.
SETS = [
    "model.lora.r=8",
    "sft.data.train.max_rows=64",
    "sft.data.eval.max_rows=16",
    "preference.data.train.max_rows=32",
    "preference.data.eval.max_rows=16",
    "preference.training.max_steps=2",
    "preference.training.total_batch_size=null",
    "preference.training.per_device_train_batch_size=8",
    f"evaluate.benchmarks.0.questions={ROOT / 'recipes/tiny/benchmarks/alpaca_eval.json'}",
    # A secret of the environment in a value the card shows: redacted there.
    f"description=notes {HF_TOKEN}",
    # Both stages, each to its own repository; the SFT one on a branch of its own.
    "hub.repo_id=me/tiny-{stage}",
    "hub.stages=[sft, preference]",
    "hub.revision.sft=v1",
]


class FakeHub:
    """HfApi's create_repo, create_branch, upload_folder and upload_file, recorded. upload_folder
    copies the files it would send into uploads/<repo>@<revision>/<n>/."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.calls: list[tuple[str, dict]] = []
        self.fail: dict[str, Exception] = {}

    def install(self, patch: pytest.MonkeyPatch) -> None:
        for name in ("create_repo", "create_branch", "upload_folder", "upload_file"):
            patch.setattr(HfApi, name, self._method(name))

    def _method(self, name):
        def method(api, *args, **kwargs):
            if name in self.fail:
                raise self.fail[name]
            self.calls.append((name, {"args": args, **kwargs}))
            return getattr(self, name)(*args, **kwargs)

        return method

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        return None

    def upload_folder(self, *, repo_id, folder_path, revision=None, ignore_patterns=None, **kw):
        source = Path(folder_path)
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        ignored = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        target = self.folder / f"{repo_id.replace('/', '--')}@{revision or 'main'}"
        target = target / str(len(self.calls))
        for name in filter_repo_objects(files, ignore_patterns=ignored):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target / name)
        return self._commit(repo_id)

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        return self._commit(repo_id)

    def _commit(self, repo_id) -> CommitInfo:
        oid = f"{len(self.calls):040x}"
        url = f"https://huggingface.co/{repo_id}/commit/{oid}"
        return CommitInfo(commit_url=url, commit_message="", commit_description="", oid=oid)

    def named(self, name: str) -> list[dict]:
        return [call for method, call in self.calls if method == name]


def run_simpo(*args) -> tuple[int, str, str]:
    """`simpo ARGS` through the real entry point, in this process (the fakes are in it)."""
    from conftest import run_main

    from simpo_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["simpo", *map(str, args)])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_main(main)
    return code, out.getvalue(), err.getvalue()


def train(out: Path, *sets: str) -> tuple[int, str, str]:
    args = [arg for s in [*SETS, *sets] for arg in ("--set", s)]
    return run_simpo("train", "tiny", "-o", out, *args)


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """`simpo train tiny` with LoRA and a hub: section, HF_TOKEN set, HfApi faked: the run
    folder, the fake hub and the command's output."""
    from simpo_cli import launch

    root = tmp_path_factory.mktemp("hub")
    hub = FakeHub(root / "uploads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", HF_TOKEN)
        patch.delenv("LOCAL_RANK", raising=False)
        patch.delenv(launch.LAUNCHED_ENV, raising=False)
        hub.install(patch)
        code, stdout, stderr = train(root / "out")
        assert code == 0, stdout[-3000:] + stderr[-3000:]
        yield root / "out", hub, stdout


def card(path: Path) -> tuple[dict, str]:
    """(the card's YAML header, its text), the header read by huggingface_hub and by yaml."""
    loaded = ModelCard.load(path)
    header = yaml.safe_load(path.read_text().split("---")[1])
    assert header == loaded.data.to_dict()
    return header, loaded.text


# --------------------------------------------------------------------------- model cards


def test_the_preference_card_says_what_trained_it(hub_run):
    out, _, _ = hub_run
    header, text = card(out / "preference" / "README.md")
    assert header["library_name"] == "transformers"
    assert {"simpo", "simpo-cli", "alignment", "lora"} <= set(header["tags"])
    # It continues the SFT stage's model, pushed as me/tiny-sft; the data are local files only.
    assert header["base_model"] == "me/tiny-sft"
    assert "datasets" not in header
    assert "`pref_train.jsonl` (a local file or folder), split `train`, its first 32 rows" in text
    # The hyperparameters as the recipe resolved them, gamma both ways.
    for row in ("| beta | 2 |", "| gamma_beta_ratio (gamma / beta) | 0.5 |",
                "| gamma (= beta x gamma_beta_ratio) | 1 |", "| sft_weight | 1 |",
                "| learning_rate | 0.001 |", "| max_steps | 2 |",
                "| total batch (examples per optimizer step) | 8 |", "| max_prompt_length | 40 |",
                "| lora.r | 8 |"):  # fmt: skip
        assert row in text, row
    assert "Recipe `tiny`: sft -> **preference** -> evaluate. This model is stage 2 of 3" in text
    assert CITATION_TITLE in text and "Meng, Yu and Xia, Mengzhou and Chen, Danqi" in text
    assert "NeurIPS" in text
    # Where it loads from: its repository.
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-preference")' in text


def test_the_evaluate_stage_puts_its_table_into_the_cards(hub_run):
    out, _, _ = hub_run
    table = (out / "evaluate" / "comparison.md").read_text().split("\n\n")[0].strip()
    assert "| tiny-sft |" in table and "| tiny-preference |" in table
    for stage in ("sft", "preference"):
        _, text = card(out / stage / "README.md")
        assert f"this model is the row `tiny-{stage}`" in text
        assert table in text
        assert "replaces this line" not in text  # the note before the evaluation is gone


def test_adapter_cards_name_the_base_and_how_to_load_it(hub_run):
    out, _, _ = hub_run
    # The SFT stage wrote its adapter only: its folder's card is a peft card on the
    # from_config model, which has no hub name.
    header, text = card(out / "sft" / "README.md")
    assert header["library_name"] == "peft" and "base_model" not in header
    assert {"sft", "simpo-cli", "alignment", "lora"} <= set(header["tags"])
    assert "a new `llama` model built from config, with random weights (seed 42" in text
    assert (
        'PeftModel.from_pretrained(base, "me/tiny-sft", revision="v1", subfolder="adapter")' in text
    )
    # The preference stage's adapter sits on the SFT stage's model, pushed as me/tiny-sft.
    header, text = card(out / "preference" / "adapter" / "README.md")
    assert header["library_name"] == "peft" and header["base_model"] == "me/tiny-sft"
    assert "It needs its base model, which it does not hold: the model of this pipeline's " in text
    # Loading it: the SFT model is its adapter on the recipe's model (no hub name: a folder),
    # merged; then this adapter on it.
    sft = 'PeftModel.from_pretrained(base, "me/tiny-sft", revision="v1", subfolder="adapter")'
    code = [
        'base = AutoModelForCausalLM.from_pretrained("path/to/base")',
        f"base = {sft}.merge_and_unload()",
        'model = PeftModel.from_pretrained(base, "me/tiny-preference", subfolder="adapter")',
    ]
    assert "\n".join(code) in text
    assert "sft -> **preference** -> evaluate" in text and CITATION_TITLE in text


def test_the_adapter_card_loads_the_model_of_its_stage(hub_run, tmp_path):
    """The adapter card's code, run with the folders in place of its paths (the card of a run
    without a hub: section), gives the preference stage's model: the recipe's model (the tiny
    seeded one, saved), the SFT adapter merged into it, then this adapter on that."""
    import torch
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    out, _, _ = hub_run
    recipe = load_recipe("tiny", [s for s in SETS if not s.startswith("hub.")])
    copy = tmp_path / "preference"
    shutil.copytree(out / "preference", copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    write_cards(recipe, "preference", copy, "sft")
    text = (copy / "adapter" / "README.md").read_text()
    code = text.split("```python\n")[1].split("```")[0]
    folders = {"base": save_tiny_model(tmp_path / "base"), "sft": out / "sft",
               "preference/adapter": copy / "adapter"}  # fmt: skip
    for name, folder in folders.items():
        assert f'"path/to/{name}"' in code, code
        code = code.replace(f'"path/to/{name}"', repr(str(folder)))
    names: dict = {}
    exec(code, names)
    ids = torch.tensor([[1, 7, 9, 12, 30, 41]])
    merged = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        torch.testing.assert_close(
            names["model"](ids).logits, merged(ids).logits, atol=1e-4, rtol=0
        )


def test_cards_hold_no_secret_and_no_path_of_this_machine(hub_run):
    out, hub, stdout = hub_run
    cards = sorted(out.rglob("README.md")) + sorted(hub.folder.rglob("README.md"))
    assert len(cards) >= 4
    for path in cards:
        text = path.read_text()
        assert HF_TOKEN not in text, path
        assert str(RECIPES_DIR) not in text and str(out.parent) not in text, path
    assert "The recipe: notes ***" in (out / "preference" / "README.md").read_text()
    leaks = [p for p in out.rglob("*") if p.is_file() and HF_TOKEN.encode() in p.read_bytes()]
    assert not leaks and HF_TOKEN not in stdout


def test_a_paper_recipe_card_names_its_hub_model_and_data(tmp_path):
    """Card data of a pretrained hub model on hub datasets (no training: the card is built from
    the recipe): base_model and datasets are hub names; gamma = 2.5 x 0.55."""
    folder = tmp_path / "preference"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    recipe = load_recipe("llama3-instruct-simpo")
    (path,) = write_cards(recipe, "preference", folder, None)
    header, text = card(path)
    assert header["base_model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert header["datasets"] == ["princeton-nlp/llama3-ultrafeedback"]
    assert "split `train`" in text and "split `test`" in text
    assert "| gamma_beta_ratio (gamma / beta) | 0.55 |" in text
    assert "| gamma (= beta x gamma_beta_ratio) | 1.375 |" in text
    assert "| total batch (examples per optimizer step) | 128 |" in text
    assert 'from_pretrained("path/to/preference")' in text  # no hub: section, no repository

    # A local model folder: named by its last part, in the text only.
    (tmp_path / "my-model").mkdir()
    recipe = load_recipe("llama3-instruct-simpo", [f"model.name_or_path={tmp_path / 'my-model'}"])
    header, text = card(write_cards(recipe, "preference", folder, None)[0])
    assert "base_model" not in header
    assert "Base model: a local model folder, `my-model` (not on the hub)." in text
    assert str(tmp_path) not in text


def test_an_on_policy_card_names_the_prompts_and_the_scorer(tmp_path):
    """Pairs an annotate stage made: the card names the prompts each split was sampled on
    (their hub dataset in the card data) and the reward model that scored them."""
    folder = tmp_path / "preference"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    recipe = load_recipe("gemma2-9b-it-simpo-onpolicy")
    recipe.connect_stages(tmp_path)
    header, text = card(write_cards(recipe, "preference", folder, None)[0])
    assert header["base_model"] == "google/gemma-2-9b-it"
    assert header["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    for split in ("train_prefs", "test_prefs"):
        assert (
            "on-policy pairs this pipeline made: the `generate` stage sampled the policy on "
            "[`HuggingFaceH4/ultrafeedback_binarized`](https://huggingface.co/datasets/"
            f"HuggingFaceH4/ultrafeedback_binarized), split `{split}`, and the `annotate` stage "
            "scored the samples with `RLHFlow/ArmoRM-Llama3-8B-v0.1`"
        ) in text
    assert str(tmp_path) not in text


# --------------------------------------------------------------------------- pushes


def test_the_finished_stages_are_pushed_after_the_evaluate_stage(hub_run):
    out, hub, stdout = hub_run
    repos = {call["args"][0]: call for call in hub.named("create_repo")}
    assert set(repos) == {"me/tiny-sft", "me/tiny-preference"}
    assert all(call["private"] is True and call["exist_ok"] is True for call in repos.values())
    assert [(c["args"][0], c["branch"]) for c in hub.named("create_branch")] == [
        ("me/tiny-sft", "v1")
    ]
    uploads = {call["repo_id"]: call for call in hub.named("upload_folder")}
    assert uploads["me/tiny-sft"]["revision"] == "v1"
    assert uploads["me/tiny-preference"]["revision"] is None
    assert not hub.named("upload_file")

    (sent,) = hub.folder.glob("me--tiny-preference@main/*")
    files = {p.relative_to(sent).as_posix() for p in sent.rglob("*") if p.is_file()}
    expected = {"README.md", "model.safetensors", "config.json", "tokenizer.json",
                "resolved_recipe.yaml", "adapter/README.md", "adapter/adapter_model.safetensors",
                "adapter/adapter_config.json"}  # fmt: skip
    assert expected <= files, sorted(expected - files)
    assert (out / "preference" / "checkpoint-2").is_dir()  # there, but not sent
    assert not [f for f in files if f.startswith("checkpoint-") or f == "training_args.bin"]
    # The card sent carries the evaluate stage's table: the push came after it.
    assert "this model is the row `tiny-preference`" in (sent / "README.md").read_text()

    record = json.loads((out / "preference" / "hub_push.json").read_text())["pushes"]
    assert [(r["repo_id"], r["revision"]) for r in record] == [("me/tiny-preference", None)]
    assert len(record[0]["commit"]) == 40
    assert "[hub] preference: pushed to https://huggingface.co/me/tiny-preference" in stdout
    assert "[hub] sft: pushed to https://huggingface.co/me/tiny-sft/tree/v1" in stdout
    # Where it would go, in the settings the stage printed as it started.
    shown = [line.split() for line in stdout.splitlines() if line.startswith("  hub.")]
    assert ["hub.repo_id", "me/tiny-preference", "--set"] in shown
    assert ["hub.revision", "v1", "--set"] in shown


def test_the_card_is_written_before_the_stage_counts_as_finished(hub_run):
    out, _, _ = hub_run
    for stage in ("sft", "preference"):  # adapter/README.md: written once, by the stage itself
        card_written = (out / stage / "adapter" / "README.md").stat().st_mtime_ns
        assert card_written <= (out / stage / "stage_complete.json").stat().st_mtime_ns


def test_only_the_command_itself_pushes(monkeypatch):
    """Not the training processes it launched, nor the stage commands it runs one by one (it
    pushes after them), nor machines other than 0."""
    from simpo_cli import launch
    from simpo_cli.run.command import PUSHED_BY_PARENT, _pushes_here

    for name in (launch.LAUNCHED_ENV, PUSHED_BY_PARENT, "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    hub = ["hub.repo_id=me/x"]
    assert _pushes_here(load_recipe("tiny", hub))
    assert not _pushes_here(load_recipe("tiny"))
    machines = ["launch.num_machines=2", "launch.main_process_ip=10.0.0.1"]
    assert _pushes_here(load_recipe("tiny", [*hub, *machines]))
    assert not _pushes_here(load_recipe("tiny", [*hub, *machines, "launch.machine_rank=1"]))
    monkeypatch.setenv(PUSHED_BY_PARENT, "1")
    assert not _pushes_here(load_recipe("tiny", hub))
    monkeypatch.delenv(PUSHED_BY_PARENT)
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")
    assert not _pushes_here(load_recipe("tiny", hub))


def test_a_rerun_pushes_nothing_again(hub_run, monkeypatch):
    out, hub, _ = hub_run
    before = len(hub.calls)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    code, stdout, stderr = train(out)
    assert code == 0, stderr[-3000:]
    assert len(hub.calls) == before
    assert "[hub] preference: already pushed to https://huggingface.co/me/tiny-preference" in stdout


def test_a_changed_card_is_uploaded_alone(hub_run, tmp_path, monkeypatch):
    """A stage pushed before the evaluate stage scored it (its own command ran first): when its
    card changes, the next command uploads README.md alone, and records that commit."""
    out, hub, _ = hub_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    readme = copy / "preference" / "README.md"
    readme.write_text(readme.read_text() + "\nMore.\n")
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    before = len(hub.calls)
    code, stdout, stderr = train(copy)
    assert code == 0, stderr[-3000:]
    new = hub.calls[before:]
    assert [(name, call["path_in_repo"], call["repo_id"]) for name, call in new] == [
        ("upload_file", "README.md", "me/tiny-preference")
    ]
    record = json.loads((copy / "preference" / "hub_push.json").read_text())["pushes"]
    assert record[0]["commit"] == f"{before + 1:040x}"
    assert "[hub] preference: updating the model card on me/tiny-preference" in stdout


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            "no token",
            "no Hugging Face token here (HF_TOKEN is unset, no saved login); set HF_TOKEN",
        ),
        ("401", "the hub refused the token (401 Unauthorized: invalid or expired); set HF_TOKEN"),
        ("network", "the hub could not be reached (ConnectError: no route); check the network"),
        ("403", "the token may not write there (403 Forbidden); use a token with write access"),
        ("offline", "HF_HUB_OFFLINE is set, which keeps huggingface_hub off the network; unset it"),
    ],
)
def test_a_failed_push_is_one_line_and_keeps_the_model(hub_run, tmp_path, monkeypatch, failure,
                                                       expected):  # fmt: skip
    """Another repository for the same finished run: each way the push can fail is one line
    per stage naming the stage, the repository and the fix; exit 2; the model and the records
    of the earlier push stay as they were."""
    out, hub, _ = hub_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    record = (copy / "preference" / "hub_push.json").read_text()
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    if failure == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    if failure in ("401", "403"):
        response = httpx2.Response(int(failure), request=request)
        hub.fail["create_repo"] = HfHubHTTPError(f"{failure} Client Error", response=response)
    if failure == "offline":
        hub.fail["create_repo"] = OfflineModeIsEnabled("offline")
    if failure == "network":
        hub.fail["upload_folder"] = httpx2.ConnectError("no route", request=request)
    try:
        code, stdout, stderr = train(copy, "hub.repo_id=other/tiny-{stage}")
    finally:
        hub.fail.clear()
    assert code == 2, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, stderr
    assert errors[0].startswith("error: hub: pushing stage 'sft' to other/tiny-sft (revision v1) ")
    assert errors[1].startswith("error: hub: pushing stage 'preference' to other/tiny-preference ")
    for line in errors:
        assert expected in line, line
        assert line.endswith("then run the same command again (the trained model is kept in "
                             f"{copy / line.split(chr(39))[1]})")  # fmt: skip
    assert (copy / "preference" / "stage_complete.json").is_file()
    assert (copy / "preference" / "model.safetensors").is_file()
    assert (copy / "preference" / "hub_push.json").read_text() == record
    assert HF_TOKEN not in stdout + stderr
    warned = "hub: no Hugging Face token found here; the stages run, and the push at the end fails"
    assert (warned in stdout) == (failure == "no token")


# --------------------------------------------------------------------------- the hub: keys


def test_validate_shows_the_pushes_and_checks_the_hub_keys(cli, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    result = cli("validate", "tiny", "--set", "hub.repo_id=me/tiny")
    assert result.code == 0, result.stderr
    assert (
        "  hub: preference -> https://huggingface.co/me/tiny, revision main (private if created)"
        in result.stdout
    )
    assert (
        "  hub: token: none found here, so a push from here would fail; set HF_TOKEN"
        in result.stdout
    )

    wrong = {
        "hub.repo_id=me/tiny--x":
            "hub.repo_id: 'me/tiny--x' is not a hub repository name; write namespace/name",
        "hub.repo_id=me/{run}":
            "hub.repo_id: 'me/{run}' holds {run}; the placeholders are {recipe} and {stage}",
        "hub.revison=v1": "hub.revison: unknown key; did you mean 'revision'?",
        "hub.stages=[generate]":
            "hub.stages: generate writes no model to push; list training stages (sft, preference)",
        "hub.stages=[prefrence]": "hub.stages[0] = 'prefrence': input should be",
        "hub.revision=a..b": "hub.revision: 'a..b' is not a branch name",
    }  # fmt: skip
    for override, message in wrong.items():
        sets = ["--set", override] + ([] if override.startswith("hub.repo_id") else
                                      ["--set", "hub.repo_id=me/tiny-{stage}"])  # fmt: skip
        result = cli("validate", "tiny", *sets)
        assert result.code == 2, override
        assert len(result.errors()) == 1 and message in result.errors()[0], result.errors()
    # Two stages on one repository and revision; a stage the pipeline does not run.
    result = cli(
        "validate", "tiny", "--set", "hub.repo_id=me/tiny", "--set", "hub.stages=[sft, preference]"
    )
    assert result.errors() == [
        f"error: {RECIPES_DIR / 'tiny' / 'recipe.yaml'}: hub: stages sft and preference would both "
        "push to me/tiny (revision main); put {stage} in hub.repo_id (a repository per stage) or "
        "in hub.revision (a branch per stage: revision: '{stage}')"
    ]
    result = cli("validate", "tiny", "--set", "hub.repo_id=me/x-{stage}",
                 "--set", "hub.stages=[sft]", "--set", "pipeline=[preference]")  # fmt: skip
    assert (
        "hub.stages: sft is not in the pipeline [preference]; add it to the pipeline"
        in result.errors()[0]
    )
    # A revision per stage puts both on one repository.
    one_repo = ["--set", "hub.repo_id=me/tiny", "--set", "hub.stages=[sft, preference]"]
    result = cli("validate", "tiny", *one_repo, "--set", "hub.revision={stage}")
    assert (
        result.code == 0 and "sft -> https://huggingface.co/me/tiny, revision sft" in result.stdout
    )


def test_the_dry_run_says_what_it_would_push(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    out = tmp_path / "out"
    result = cli("train", "tiny", "-o", out, "--dry-run", "--set", "hub.repo_id=me/tiny-{stage}",
                 "--set", "hub.private=false")  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert "hub (pushed at the end of the command, once finished):" in result.stdout
    assert (f"  preference ({out / 'preference'}) -> https://huggingface.co/me/tiny-preference, "
            "revision main (public if created)") in result.stdout  # fmt: skip
    assert "  token: found (HF_TOKEN or the saved login)" in result.stdout
    assert HF_TOKEN not in result.stdout
