"""Pushing finished stage folders to the Hugging Face Hub (the recipe's `hub:` section).

When: at the end of a stage command (`simpo train`, `simpo preference`, ...), once every stage it
ran has finished, from the command's own process (never from the launched training processes,
nor from machines other than 0), so the push of a stage that an evaluate stage scores carries
its table. Every stage named by hub.stages that has finished in the output folder is pushed
then, whichever command finished it.

What: the stage folder as it is (model, tokenizer, README.md card, adapter/, the stage's
records), less the checkpoints and the training state a reader of the hub has no use for
(EXCLUDED). The repository is created when missing (private by default; an existing one keeps
its visibility), the revision branched from main when missing.

Resumable: a pushed stage records the push in its folder (hub_push.json: repository, revision,
commit). A rerun does not push it again; where the card has changed since (a later evaluate
stage added its table) it uploads README.md alone.

The token: huggingface_hub's own resolution (HF_TOKEN, else the saved login of `hf auth
login`); simpo never reads it into a file or a message. Any failure (no token, refused, no
network) is one line per stage naming the repository and the fix; the trained model stays.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from simpo_cli.errors import UserError
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import Recipe
from simpo_cli.redact import redact_text

RECORD = "hub_push.json"
# Not uploaded: checkpoints (optimizer state, RNG states: for resuming here), the pickled
# TrainingArguments, scratch folders, and the run's own markers.
EXCLUDED = [
    "checkpoint-*", "start_model/*", "merged_model/*", "*.pt", "*.pth", "training_args.bin",
    "trainer_state.json", "stopped.json", ".ready-*", RECORD,
]  # fmt: skip
HUB = "https://huggingface.co"
LOGIN_FIX = "set HF_TOKEN to a token with write access, or log in with `hf auth login`"


def _say(message: str) -> None:
    # One process pushes (the command's own), and this module must not load torch (validate,
    # --dry-run): a plain print, not distributed.say.
    print(message, flush=True)


def push_finished_stages(recipe: Recipe, out: Path) -> None:
    """Push each stage of hub.stages that has finished in `out` and is not on the hub yet, or
    whose card changed since its push. Every failure at once, one line each (UserError)."""
    targets = recipe.hub_targets()
    if not targets or recipe.launch.machine_rank != 0:
        return
    problems = []
    for stage, (repo_id, revision) in targets.items():
        stage_dir = StageDir(out / recipe.final_folder(stage))  # with rounds: the last one's
        if not stage_dir.is_complete():
            _say(f"[hub] {stage}: not finished in {stage_dir.path}; pushed once it is")
            continue
        try:
            _push(recipe, stage, stage_dir, repo_id, revision)
        except PushFailed as err:
            at = f" (revision {revision})" if revision else ""
            problems.append(
                f"hub: pushing stage '{stage}' to {repo_id}{at} failed: {err}, then run the same "
                f"command again (the trained model is kept in {stage_dir.path})"
            )
    if problems:
        raise UserError([redact_text(line) for line in problems])


class PushFailed(Exception):
    """Why a push failed and the fix, as one clause: `no token ...; set HF_TOKEN ...`."""


def token_found() -> bool:
    """Whether huggingface_hub finds a token (environment or saved login), without the network."""
    from huggingface_hub import get_token

    return get_token() is not None


def plan_lines(recipe: Recipe, out: Path | None = None) -> list[str]:
    """What the run pushes, for --dry-run (with the output folder) and `simpo validate`: one
    line per stage, and one on the token (found or not, never its value). No network."""
    targets = recipe.hub_targets()
    if not targets:
        return []
    visibility = "private" if recipe.hub.private else "public"
    lines = [
        f"{stage}{f' ({out / recipe.final_folder(stage)})' if out else ''} -> {HUB}/{repo}, "
        f"revision {revision or 'main'} ({visibility} if created)"
        for stage, (repo, revision) in targets.items()
    ]
    token = (
        "token: found (HF_TOKEN or the saved login)"
        if token_found()
        else f"token: none found here, so a push from here would fail; {LOGIN_FIX}"
    )
    return [*lines, token]


def pushed(stage_dir: StageDir) -> list[dict[str, Any]]:
    """The pushes recorded in a stage folder."""
    path = stage_dir.path / RECORD
    return json.loads(path.read_text())["pushes"] if path.is_file() else []


def _push(recipe: Recipe, stage: str, stage_dir: StageDir, repo_id: str, revision: str | None):
    records = pushed(stage_dir)
    card = stage_dir.path / "README.md"
    card_hash = hashlib.sha256(card.read_bytes()).hexdigest() if card.is_file() else None
    done = next((r for r in records if r["target"] == repo_id and r["revision"] == revision), None)
    if done is not None and done["card_sha256"] == card_hash:
        _say(f"[hub] {stage}: already pushed to {done['url']} (commit {done['commit'][:12]})")
        return
    if not token_found():
        raise PushFailed(f"no Hugging Face token here (HF_TOKEN is unset, no saved login); "
                         f"{LOGIN_FIX}")  # fmt: skip
    from huggingface_hub import HfApi

    api = HfApi()
    with _hub_errors():
        if done is None:
            _say(f"[hub] {stage}: pushing {stage_dir.path} to {repo_id}")
            full_id = api.create_repo(
                repo_id, private=recipe.hub.private, exist_ok=True, repo_type="model"
            ).repo_id
            if revision is not None:
                api.create_branch(full_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=full_id,
                folder_path=str(stage_dir.path),
                revision=revision,
                ignore_patterns=EXCLUDED,
                commit_message=f"simpo-cli: the {stage} stage of {recipe.name}",
            )
        else:  # pushed before; its card has changed since (the evaluate stage's table)
            full_id = done["repo_id"]
            _say(f"[hub] {stage}: updating the model card on {full_id}")
            commit = api.upload_file(
                path_or_fileobj=str(card),
                path_in_repo="README.md",
                repo_id=full_id,
                revision=revision,
                commit_message=f"simpo-cli: the {stage} stage's model card, updated",
            )
    url = f"{HUB}/{full_id}" + (f"/tree/{revision}" if revision else "")
    record = {
        "target": repo_id,
        "repo_id": full_id,
        "revision": revision,
        "url": url,
        "commit": commit.oid,
        "card_sha256": card_hash,
        "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    others = [r for r in records if not (r["target"] == repo_id and r["revision"] == revision)]
    stage_dir.write_json(RECORD, {"pushes": [*others, record]})
    _say(f"[hub] {stage}: pushed to {url} (commit {commit.oid[:12]})")


@contextmanager
def _hub_errors() -> Iterator[None]:
    """huggingface_hub's failures as PushFailed: what went wrong, and the fix."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # The HTTP library's own errors (a refused connection, a timeout) are not OSErrors: their
    # base is the HTTPError that huggingface_hub's HTTP error derives from.
    transport = tuple(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")
    try:
        yield
    except OfflineModeIsEnabled:
        raise PushFailed(
            "HF_HUB_OFFLINE is set, which keeps huggingface_hub off the network; unset it"
        ) from None
    except HfHubHTTPError as err:
        raise PushFailed(_http_problem(getattr(err.response, "status_code", None), err)) from None
    except (OSError, *transport) as err:
        raise PushFailed(
            f"the hub could not be reached ({type(err).__name__}: {_first_line(err)}); check "
            "the network (and HF_ENDPOINT, if set)"
        ) from None


def _http_problem(status: int | None, err: Exception) -> str:
    if status == 401:
        return f"the hub refused the token (401 Unauthorized: invalid or expired); {LOGIN_FIX}"
    if status == 403:
        return (
            "the token may not write there (403 Forbidden); use a token with write access to "
            "that namespace, or another hub.repo_id"
        )
    return f"the hub answered {status}: {_first_line(err)}; check hub.repo_id and hub.revision"


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
