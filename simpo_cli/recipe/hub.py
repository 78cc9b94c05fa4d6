"""The `hub:` section: which stages' model folders go to the Hugging Face Hub, to which repository
and revision (run/hub.py pushes them; the token comes from the environment, never the recipe).

    hub:
      repo_id: my-org/{recipe}-{stage}   # {recipe} and {stage} are filled in
      private: true                      # a repository created private
      stages: [sft, preference]          # default: the pipeline's last training stage
      revision: main                     # or '{stage}' (a branch each), or {sft: v1, ...}

One repository per stage ({stage} in repo_id), or one repository with a revision (branch) per
stage ({stage} in revision, or a revision named per stage): two stages may not land on the same
repository and revision.
"""

from __future__ import annotations

import re
import string
from typing import Any

from pydantic import Field, field_validator

from simpo_cli.recipe.common import TRAINING_STAGES, Section, StageName

PLACEHOLDERS = ("recipe", "stage")
# A branch name git and the hub accept: no spaces, no `..`, no leading `-` or `/`.
_REVISION = re.compile(r"[A-Za-z0-9_.\-][A-Za-z0-9_.\-/]*")


class HubSettings(Section):
    """Push stage folders (model, tokenizer, model card, records) to the Hugging Face Hub when the
    run has finished them."""

    repo_id: str = Field(
        description="Repository, `namespace/name` (a bare name: the token's own account); "
        "{stage} and {recipe} are filled in, e.g. my-org/{recipe}-{stage}."
    )
    private: bool = Field(
        True, description="Create the repository private (an existing one keeps its visibility)."
    )
    stages: list[StageName] | None = Field(
        None,
        description="Training stages to push; default: the pipeline's last training stage (the "
        "final model).",
    )
    revision: str | dict[StageName, str] | None = Field(
        None,
        description="Branch to push to, created from main when missing: one name (may hold "
        "{stage}) or one per stage ({sft: sft-v1, preference: v1}); default: main.",
    )

    @field_validator("repo_id")
    @classmethod
    def _check_repo_id(cls, value: str) -> str:
        _check_placeholders(value, "repo_id")
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(fill(value, recipe="recipe", stage="stage"))
        except HFValidationError:
            raise ValueError(
                f"'{value}' is not a hub repository name; write namespace/name (letters, digits, "
                "'-', '_', '.', at most 96 characters, no '--' or '..'), e.g. my-org/tiny-{stage}"
            ) from None
        return value

    @field_validator("revision", mode="before")
    @classmethod
    def _placeholder_read_as_mapping(cls, value: Any) -> Any:
        # YAML reads an unquoted `revision: {stage}` as the mapping {stage: null}: what was
        # meant is the template.
        if isinstance(value, dict) and len(value) == 1:
            ((key, item),) = value.items()
            if key in PLACEHOLDERS and item is None:
                return f"{{{key}}}"
        return value

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, value: str | dict[str, str] | None):
        names = [value] if isinstance(value, str) else list((value or {}).values())
        for name in names:
            _check_placeholders(name, "revision")
            filled = fill(name, recipe="recipe", stage="stage")
            if not _REVISION.fullmatch(filled) or ".." in filled or filled.endswith(("/", ".")):
                raise ValueError(
                    f"'{name}' is not a branch name; use letters, digits, '-', '_', '.' and '/', "
                    "e.g. v1 or {stage}"
                )
        return value

    def pushed_stages(self, pipeline: list[str]) -> list[str]:
        """The stages pushed: `stages`, else the pipeline's last training stage."""
        if self.stages is not None:
            return list(self.stages)
        return [name for name in pipeline if name in TRAINING_STAGES][-1:]

    def target(self, stage: str, recipe: str) -> tuple[str, str | None]:
        """(repository, revision or None for main) the stage goes to."""
        revision = self.revision.get(stage) if isinstance(self.revision, dict) else self.revision
        filled = fill(revision, recipe=recipe, stage=stage) if revision else None
        return fill(self.repo_id, recipe=recipe, stage=stage), filled


def fill(template: str, **values: str) -> str:
    return template.format(**values)


def _check_placeholders(template: str, key: str) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:
        fields = ["?"]
    wrong = [name for name in fields if name not in PLACEHOLDERS]
    if wrong:
        raise ValueError(
            f"'{template}' holds {{{wrong[0]}}}; the placeholders are {{recipe}} and {{stage}} "
            f"(write a literal brace twice: {{{{ }}}})"
        )
