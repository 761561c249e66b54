"""The checkpoint manifest (manifest.json) as a pydantic model.

`schema_version` gates loading: a manifest written by a newer, unknown schema is refused rather than
half-understood. The template lives here and only here: training and serving both render trajectories
from `manifest.template`, so the two can never disagree about marker strings.

Schema 2 (this build writes it) adds head kinds (`value_head.kind`: linear | linear2 | lm_pair | mlp, with
`normalisation`) and native templates (`template.kind`: marker | native). A schema-1 manifest reads as a
linear head (`type: linear`) and a marker template, which is what schema 1 could express.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"


class Template(BaseModel):
    """How a trajectory becomes text (model_store/render.py renders it; docs/ARCHITECTURE.md, "Rendering").

    `kind: marker` (ours, the default for checkpoints we train): the five marker strings below, each a single
    special token, between segments; readouts at `action_end` and `state_end`.

    `kind: native` (an imported PRM's own format): literal strings (`preamble`, `task_suffix`, `step_prefix`,
    `step_tag`, `step_suffix`; special-token strings in them are special tokens) around user text shaped by
    `task_format` / `first_step_format` / `step_format` (user text: special-token strings in it stay plain
    text). The promise of step t is read at the last token of its `step_tag`; V_0 at the last token before the
    first step. Step t's text is its action, preceded by its observation and `observation_separator` when the
    observation is not empty (o_0 joins the task the same way).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["marker", "native"] = "marker"
    task_prefix: str = "<|task|>"
    observation_prefix: str = "<|obs|>"
    action_prefix: str = "<|act|>"
    action_end: str = "<|end|>"
    state_end: str = "<|state|>"
    # Reserved: a chat template wrapping the rendering. Nothing renders one yet, so a manifest that sets it
    # is refused rather than silently served with a rendering its model was not trained on. (Native templates
    # express a source model's chat turns as the literal strings below, read from its chat template at import.)
    chat_template: str | None = None
    # -- native templates only --
    family: str | None = None  # which importer wrote it (math-shepherd, rlhflow, qwen-prm, skywork, trl-prm)
    preamble: str = ""
    task_format: str = "{text}"
    task_suffix: str = ""
    first_step_format: str = "{text}"
    step_format: str = "{text}"
    step_prefix: str = ""  # before every step but the first (the first follows task_suffix directly)
    step_tag: str = ""
    step_suffix: str = ""
    observation_separator: str = "\n"
    # Encode pieces without the space a sentencepiece-style tokenizer puts before every text (its Prepend('▁')
    # normalizer / Metaspace prepend): the source encoded one whole text, which got that space once, and the
    # formats carry it (task_format ' {text}').
    strip_added_space: bool = False

    @field_validator("chat_template")
    @classmethod
    def _no_chat_template(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("chat templates are not supported: trajectories are rendered segment-wise with the "
                             "marker tokens (docs/ARCHITECTURE.md, 'Rendering'); remove the field or set it to null")
        return value

    @field_validator("task_format", "first_step_format", "step_format")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        if value.count("{text}") != 1 or value.replace("{text}", "").count("{") or value.count("}") != 1:
            raise ValueError("a format holds '{text}' exactly once and no other braces")
        return value

    @model_validator(mode="after")
    def _native_needs_a_tag(self) -> "Template":
        if self.kind == "native" and not self.step_tag:
            raise ValueError("a native template needs a step_tag (the readout is its last token)")
        return self

    def markers(self) -> list[str]:
        """The special-token markers of a marker template (a native template has none of its own)."""
        if self.kind == "native":
            return []
        return [self.task_prefix, self.observation_prefix, self.action_prefix, self.action_end, self.state_end]


class BackboneSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    architecture: str = "Qwen2Model"
    config: dict[str, Any] = Field(default_factory=dict)


class Normalisation(BaseModel):
    """Affine normalisation of the head's logit before the activation: (logit - mean) / std (OpenRLHF's
    `normalize_reward` with the mean and std it stores in config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float = 0.0
    std: float = 1.0

    @field_validator("std")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("std must be positive")
        return value


class ValueHeadSpec(BaseModel):
    """The value head (model_store/heads.py computes it). Kinds, with their tensors in value_head.safetensors:

    - `linear`: weight [1, H], bias [1]; logit = w.h + b (ours).
    - `linear2`: weight [2, H], bias [2] (rows: negative, positive class); logit = l_pos - l_neg, so
      sigmoid(logit) is the 2-way softmax of the positive class.
    - `lm_pair`: the same two-row layout holding the LM head's rows of the positive and negative tokens
      (`tokens`); sigmoid of the logit difference is the softmax over the pair.
    - `mlp`: fc1.weight [M, H], fc1.bias [M], fc2.weight [C, M], fc2.bias [C]: Linear(H, M) ->
      `hidden_activation` -> Linear(M, C), C = out_features (1: the logit; 2: l_pos - l_neg as for linear2).

    Then `normalisation` (optional), then `activation` (sigmoid keeps promise in [0, 1]; identity is for
    heads trained without one).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["linear", "linear2", "lm_pair", "mlp"] = "linear"
    in_features: int
    out_features: Literal[1, 2] = 1
    activation: Literal["sigmoid", "identity"] = "sigmoid"
    normalisation: Normalisation | None = None
    hidden_features: int | None = None  # mlp only
    hidden_activation: Literal["relu"] | None = None  # mlp only
    tokens: list[str] | None = None  # lm_pair only: [positive, negative] token strings, for the record

    @model_validator(mode="before")
    @classmethod
    def _schema1(cls, raw: Any) -> Any:
        # Schema 1 wrote `type: linear`; it is the `linear` kind.
        if isinstance(raw, dict) and "type" in raw:
            raw = dict(raw)
            if raw.pop("type") != "linear":
                raise ValueError("schema-1 heads are linear")
            raw.setdefault("kind", "linear")
        return raw

    @model_validator(mode="after")
    def _shape(self) -> "ValueHeadSpec":
        expected = {"linear": 1, "linear2": 2, "lm_pair": 2}.get(self.kind)
        if expected is not None and self.out_features != expected:
            raise ValueError(f"a {self.kind} head has out_features {expected}")
        if self.kind == "mlp" and not (self.hidden_features and self.hidden_activation):
            raise ValueError("an mlp head needs hidden_features and hidden_activation")
        return self


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
