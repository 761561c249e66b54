"""The checkpoint manifest (manifest.json) as a pydantic model.

`schema_version` gates loading: a manifest written by a newer, unknown schema is refused rather than
half-understood. The template lives here and only here: training and serving both render trajectories
from `manifest.template`, so the two can never disagree about marker strings.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"


class Template(BaseModel):
    """Marker strings placed between segments. Each marker is a single special token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_prefix: str = "<|task|>"
    observation_prefix: str = "<|obs|>"
    action_prefix: str = "<|act|>"
    action_end: str = "<|end|>"
    state_end: str = "<|state|>"
    # Reserved: a chat template wrapping the rendering. Nothing renders one yet, so a manifest that sets it
    # is refused rather than silently served with a rendering its model was not trained on.
    chat_template: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _no_chat_template(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("chat templates are not supported: trajectories are rendered segment-wise with the "
                             "marker tokens (docs/ARCHITECTURE.md, 'Rendering'); remove the field or set it to null")
        return value

    def markers(self) -> list[str]:
        return [self.task_prefix, self.observation_prefix, self.action_prefix, self.action_end, self.state_end]


class BackboneSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    architecture: str = "Qwen2Model"
    config: dict[str, Any] = Field(default_factory=dict)


class ValueHeadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["linear"] = "linear"
    in_features: int
    out_features: Literal[1] = 1
    # sigmoid keeps promise in [0, 1]; identity is for imported heads trained without one.
    activation: Literal["sigmoid", "identity"] = "sigmoid"


class TrainingInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str = "random-init"
    beta: float | None = None
    gamma: float | None = None
    # `lambda` is a Python keyword, hence the alias.
    lam: float | None = Field(default=None, alias="lambda")
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    command: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "1"
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    backbone: BackboneSpec
    value_head: ValueHeadSpec
    template: Template = Field(default_factory=Template)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_seq_len: int = 2048
    training: TrainingInfo = Field(default_factory=TrainingInfo)
    files: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def dump(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=False) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_checkpoint_files(root: Path) -> list[str]:
    """Every file of a checkpoint directory except the manifest itself, as sorted relative paths."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Record the sha256 of every file under `root`, then write manifest.json. Returns the final manifest."""
    root = Path(root)
    files = {rel: sha256_file(root / rel) for rel in list_checkpoint_files(root)}
    final = manifest.model_copy(update={"files": files})
    (root / MANIFEST_FILE).write_text(final.dump())
    return final
