"""Import reward and process-reward models from the ecosystem into the AgentPRM checkpoint format.

Sources are Hugging Face folders (config.json, *.safetensors, tokenizer.json, tokenizer_config.json) holding a
decoder backbone and a head, recognised by their tensor names and config fields (`detect_kind`):

| kind            | head tensors / how a step is scored                                | head     | template |
| --------------- | ------------------------------------------------------------------ | -------- | -------- |
| `qwen-prm`      | `score.0` Linear(H,H), ReLU, `score.2` Linear(H,2) at `<extra_0>`  | mlp      | native (chat) |
| `skywork`       | `v_head.summary` [1, H] + bias, sigmoid at each step's newline     | linear   | native   |
| `trl`           | `v_head.summary` [1, H] + bias (TRL value head, no activation)     | linear   | marker   |
| `openrlhf`      | `<value_head_prefix>.weight` [1, H]; config `mean`/`std` normalise | linear   | marker   |
| `trl-prm`       | `score.weight` [2, H] (+ bias): TRL PRMTrainer token classifier    | linear2  | native   |
| `seq-cls`       | `score.weight` [1, H]: AutoModelForSequenceClassification, 1 label | linear   | marker   |
| `math-shepherd` | LM head rows of '+' / '-' at the step tag ' ки'                    | lm_pair  | native   |
| `rlhflow`       | LM head rows of '+' / '-' at the assistant turn after each step    | lm_pair  | native (chat) |

Backbone tensors lose their wrapper prefix (the architecture's own `base_model_prefix`, e.g. `model.` or
`gpt_neox.`, and TRL's `pretrained_model.`); LM heads and value heads are not backbone tensors. A marker
template adds its markers to the tokenizer as special tokens, their embedding rows set to the mean embedding
(such a head has never seen our template: fine-tune before trusting its scores). A native template is the
source model's own format (model_store/render.py), so the imported model scores as its authors' code does.
Pickle weights are refused; nothing is downloaded; `trust_remote_code` is never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model_store.export import save_checkpoint
from model_store.heads import MLPHead, TwoRowHead
from model_store.manifest import Manifest, Normalisation, Template, TrainingInfo, ValueHeadSpec
from model_store.modeling import build_backbone, load_weights, read_hf_config_and_tokenizer, read_safetensors_folder
from model_store.render import adds_leading_space, without_added_space
from model_store.store import CheckpointError

KINDS = ("qwen-prm", "skywork", "trl", "openrlhf", "trl-prm", "seq-cls", "math-shepherd", "rlhflow")
WRAPPER_PREFIXES = ("pretrained_model.",)  # TRL's value-head wrapper
HEAD_PREFIXES = ("lm_head.", "embed_out.", "v_head.", "score.", "value_head.")
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_SHEPHERD_TAG = " ки"


@dataclass
class Source:
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_config: dict

    @property
    def architectures(self) -> str:
        return " ".join(self.config.get("architectures") or [])

    def token(self, field: str) -> str | None:
        """A special token's string from tokenizer_config.json (plain or {"content": ...})."""
        value = self.tokenizer_config.get(field)
        return value.get("content") if isinstance(value, dict) else value

    def tensor(self, *names: str) -> torch.Tensor | None:
        for name in names:
            for prefix in ("", *WRAPPER_PREFIXES):
                if prefix + name in self.tensors:
                    return self.tensors[prefix + name].float()
        return None


@dataclass
class Imported:
    """What `import_value_model` wrote and how it decided."""

    manifest: Manifest
    kind: str
    detected: bool  # True: found from tensor names and config; False: forced with kind=...
    reason: str
    tokenization_check: str  # native templates: segment-wise vs whole-text ids on a probe trajectory


def read_source(src: Path) -> Source:
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src / 'config.json'}: missing (an importer needs a Hugging Face model folder)")
    tensors = read_safetensors_folder(src)
    config, tokenizer = read_hf_config_and_tokenizer(src)
    tok_config_file = src / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text()) if tok_config_file.is_file() else {}
    return Source(src, config, tensors, tokenizer, tok_config)


def detect_kind(source: Source) -> tuple[str, str]:
    """(kind, why) from the tensor names and config fields; CheckpointError when nothing fits."""
    t, arch = source.tensors, source.architectures
    has = lambda name: source.tensor(name) is not None  # noqa: E731
    if has("score.0.weight") and has("score.2.weight"):
        return "qwen-prm", "tensors score.0 / score.2 (Linear-ReLU-Linear head)"
    if has("v_head.summary.weight"):
        if "prm" in arch.lower():
            return "skywork", f"tensor v_head.summary.weight and architecture {arch}"
        return "trl", "tensor v_head.summary.weight (TRL value head)"
    prefix = source.config.get("value_head_prefix")
    if prefix and has(f"{prefix}.weight"):
        return "openrlhf", f"config value_head_prefix={prefix!r}"
    if has("value_head.weight"):
        return "openrlhf", "tensor value_head.weight (OpenRLHF)"
    score = source.tensor("score.weight")
    if score is not None:
        if score.shape[0] == 2 or "TokenClassification" in arch:
            return "trl-prm", f"score.weight {tuple(score.shape)} ({arch or 'no architecture'})"
        if {"mean", "std"} <= set(source.config) or "normalize_reward" in source.config:
            return "openrlhf", "score.weight with mean/std in config.json (OpenRLHF)"
        return "seq-cls", f"score.weight {tuple(score.shape)}"
    if lm_head_of(source) is not None:
        # A chat model's vocabulary may well hold ' ки' too, so the chat template decides first.
        if source.tokenizer_config.get("chat_template"):
            return "rlhflow", "an LM head and a chat template (each step a user turn, '+' at the assistant turn)"
        if single_token(source.tokenizer, MATH_SHEPHERD_TAG) is not None:
            return "math-shepherd", f"an LM head, no chat template, and the step tag {MATH_SHEPHERD_TAG!r} as one token"
    names = sorted(t)[:5]
    raise CheckpointError(f"{source.path}: no known head (tensors {names} ...); pass --kind, one of {', '.join(KINDS)}")


def single_token(tokenizer, text: str) -> int | None:
    """The id of `text` when it is one token in running text (for a sentencepiece-style tokenizer, without the
    space it puts before a whole text)."""
    if adds_leading_space(tokenizer):
        tokenizer = without_added_space(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ids[0] if len(ids) == 1 else None


def lm_head_of(source: Source) -> torch.Tensor | None:
    head = source.tensor("lm_head.weight", "embed_out.weight")
    if head is None and source.config.get("tie_word_embeddings"):
        head = source.tensor("model.embed_tokens.weight", "embed_tokens.weight")
    return head


# -- heads -------------------------------------------------------------------------------------------------------
def _require(source: Source, name: str, kind: str) -> torch.Tensor:
    tensor = source.tensor(name)
    if tensor is None:
        raise CheckpointError(f"{source.path}: kind {kind!r} needs tensor {name!r}, which is missing")
    return tensor


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str, source: Source) -> torch.nn.Linear:
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise CheckpointError(f"{source.path}: {name} has shape {tuple(weight.shape)}; a scalar head has one output "
                              "(a two-class head is --kind trl-prm)")
    head = torch.nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias.reshape(1) if bias is not None else torch.zeros(1))
    return head


def _two_rows(negative_positive: torch.Tensor, bias: torch.Tensor | None) -> TwoRowHead:
    head = TwoRowHead(negative_positive.shape[1])
    with torch.no_grad():
        head.weight.copy_(negative_positive)
        head.bias.copy_(bias if bias is not None else torch.zeros(2))
    return head


def _pair_tokens(source: Source, kind: str) -> tuple[list[str], list[int]]:
    """[positive, negative] token strings and ids, found the way the family's own code finds them."""
    tok = source.tokenizer
    if kind == "math-shepherd":  # tokenizer.encode("+ -")[1:] (the BOS dropped)
        ids = tok.encode("+ -", add_special_tokens=False).ids
        if len(ids) != 2:
            raise CheckpointError(f"{source.path}: '+ -' is {len(ids)} tokens, expected 2 ('+' and ' -')")
    else:  # rlhflow: tokenizer.encode('+')[-1], tokenizer.encode('-')[-1]
        ids = [tok.encode("+", add_special_tokens=False).ids[-1], tok.encode("-", add_special_tokens=False).ids[-1]]
    return [tok.id_to_token(i) for i in ids], ids


def build_head(source: Source, kind: str, hidden: int, activation: str | None):
    """(head module, ValueHeadSpec) of the source's head for `kind`."""
    if kind == "qwen-prm":
        w1, b1 = _require(source, "score.0.weight", kind), _require(source, "score.0.bias", kind)
        w2, b2 = _require(source, "score.2.weight", kind), source.tensor("score.2.bias")
        head = MLPHead(hidden, w1.shape[0], w2.shape[0])
        with torch.no_grad():
            head.fc1.weight.copy_(w1)
            head.fc1.bias.copy_(b1)
            head.fc2.weight.copy_(w2)
            head.fc2.bias.copy_(b2 if b2 is not None else torch.zeros(w2.shape[0]))
        spec = ValueHeadSpec(kind="mlp", in_features=hidden, out_features=w2.shape[0], hidden_features=w1.shape[0],
                             hidden_activation="relu", activation=activation or "sigmoid")
        return head, spec
    if kind in ("skywork", "trl"):
        head = _linear(_require(source, "v_head.summary.weight", kind), source.tensor("v_head.summary.bias"),
                       "v_head.summary.weight", source)
        default = "sigmoid" if kind == "skywork" else "identity"
        return head, ValueHeadSpec(in_features=hidden, activation=activation or default)
    if kind == "openrlhf":
        prefix = source.config.get("value_head_prefix") or ("value_head" if source.tensor("value_head.weight")
                                                            is not None else "score")
        head = _linear(_require(source, f"{prefix}.weight", kind), source.tensor(f"{prefix}.bias"),
                       f"{prefix}.weight", source)
        norm = None
        # OpenRLHF applies (reward - mean) / std at inference when normalize_reward is set.
        if source.config.get("normalize_reward") and "mean" in source.config and "std" in source.config:
            norm = Normalisation(mean=float(source.config["mean"]), std=float(source.config["std"]))
        return head, ValueHeadSpec(in_features=hidden, activation=activation or "sigmoid", normalisation=norm)
    if kind == "seq-cls":
        head = _linear(_require(source, "score.weight", kind), source.tensor("score.bias"), "score.weight", source)
        return head, ValueHeadSpec(in_features=hidden, activation=activation or "sigmoid")
    if kind == "trl-prm":
        weight = _require(source, "score.weight", kind)
        if tuple(weight.shape) != (2, hidden):
            raise CheckpointError(f"{source.path}: score.weight has shape {tuple(weight.shape)}; a token classifier "
                                  f"PRM has ({2}, {hidden}) (labels 0: bad step, 1: good step)")
        head = _two_rows(weight, source.tensor("score.bias"))
        return head, ValueHeadSpec(kind="linear2", in_features=hidden, out_features=2,
                                   activation=activation or "sigmoid")
    # math-shepherd, rlhflow: the LM head's rows of the '+' and '-' tokens.
    lm_head = lm_head_of(source)
    if lm_head is None:
        raise CheckpointError(f"{source.path}: kind {kind!r} needs the LM head (lm_head.weight), which is missing")
    tokens, (positive, negative) = _pair_tokens(source, kind)
    bias = source.tensor("lm_head.bias")
    head = _two_rows(torch.stack([lm_head[negative], lm_head[positive]]),
                     None if bias is None else torch.stack([bias[negative], bias[positive]]))
    return head, ValueHeadSpec(kind="lm_pair", in_features=hidden, out_features=2, tokens=tokens,
                               activation=activation or "sigmoid")


# -- templates ---------------------------------------------------------------------------------------------------
def _added_prefix(source: Source) -> str:
    """The special tokens the tokenizer's post-processor puts before a text (e.g. '<s>'), as a literal."""
    tok = source.tokenizer
    bare = tok.encode("x", add_special_tokens=False).ids
    full = tok.encode("x", add_special_tokens=True).ids
    n = len(full) - len(bare)
    if n <= 0 or full[n:] != bare:
        return ""
    return "".join(tok.id_to_token(i) for i in full[:n])


def _chat_text(source: Source, messages: list[dict]) -> str:
    """The source's own chat template applied to `messages` (transformers renders it; no remote code)."""
    from transformers import PreTrainedTokenizerFast

    cfg = source.tokenizer_config
    specials = {k: source.token(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if source.token(k)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=source.tokenizer, **specials)
    template = cfg.get("chat_template")
    if not template:
        raise CheckpointError(f"{source.path / 'tokenizer_config.json'}: no chat_template (this kind renders chat turns)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except Exception as exc:  # jinja errors: the template needs something we did not give it
        raise CheckpointError(f"{source.path}: cannot render its chat template ({exc})") from None


def _split(text: str, *sentinels: str) -> list[str]:
    parts = []
    for sentinel in sentinels:
        head, found, text = text.partition(sentinel)
        if not found:
            raise CheckpointError(f"the chat template dropped or changed the probe text {sentinel!r}")
        parts.append(head)
    return [*parts, text]


def native_template(source: Source, kind: str, step_separator: str = "\n", system_prompt: str | None = None
                    ) -> Template:
    if kind == "math-shepherd":  # "{question} {step 1} ки\n{step 2} ки\n..." (tokenizer adds BOS)
        # Mistral's sentencepiece tokenizer puts '▁' before the whole text once: the task carries that space.
        spaced = adds_leading_space(source.tokenizer)
        return Template(kind="native", family=kind, preamble=_added_prefix(source), first_step_format=" {text}",
                        step_tag=MATH_SHEPHERD_TAG, step_suffix="\n", strip_added_space=spaced,
                        task_format=" {text}" if spaced else "{text}")
    if kind == "skywork":  # bos + question + "\n", then each step encoded alone + the "\n" token
        return Template(kind="native", family=kind, preamble=source.token("bos_token") or "",
                        task_format="{text}\n", step_tag="\n")
    if kind == "trl-prm":  # [bos] + prompt, then each completion + separator (PRMTrainer.tokenize_row)
        bos = source.token("bos_token") or ""
        return Template(kind="native", family=kind, preamble=bos, step_tag=step_separator)
    if kind == "qwen-prm":  # system, user question, assistant "step<extra_0>step<extra_0>"
        system = QWEN_PRM_SYSTEM if system_prompt is None else system_prompt
        text = _chat_text(source, [{"role": "system", "content": system}, {"role": "user", "content": "QUESTIONQ"},
                                   {"role": "assistant", "content": "STEPONE<extra_0>STEPTWO<extra_0>"}])
        preamble, task_suffix, between, _, _ = _split(text, "QUESTIONQ", "STEPONE", "STEPTWO", "<extra_0>")
        if between != "<extra_0>":
            raise CheckpointError(f"{source.path}: the chat template changes the assistant text between steps")
        if single_token(source.tokenizer, "<extra_0>") is None and source.tokenizer.token_to_id("<extra_0>") is None:
            raise CheckpointError(f"{source.path}: '<extra_0>' is not a token of the tokenizer")
        return Template(kind="native", family=kind, preamble=preamble, task_suffix=task_suffix, step_tag="<extra_0>")
    if kind == "rlhflow":  # user: question + " " + step 1; assistant: "+"; user: step 2; assistant: "+"; ...
        text = _chat_text(source, [{"role": "user", "content": "QUESTIONQ"}, {"role": "assistant", "content": "+"},
                                   {"role": "user", "content": "STEPTWO"}, {"role": "assistant", "content": "+"}])
        preamble, tag, between, tag2 = _split(text, "QUESTIONQ", "+", "STEPTWO")
        tag2 = tag2.partition("+")[0]
        if tag != tag2:
            raise CheckpointError(f"{source.path}: the chat template renders the assistant turn differently per turn")
        return Template(kind="native", family=kind, preamble=preamble, first_step_format=" {text}", step_tag=tag,
                        step_prefix="+" + between)
    raise ValueError(kind)


def tokenization_check(tokenizer, template: Template) -> str:
    """Do segment-wise ids equal the source's whole-text ids on a probe trajectory? One line for the user."""
    from tokenizers import Tokenizer

    from model_store.render import NativeRenderer, Step

    renderer = NativeRenderer(Tokenizer.from_str(tokenizer.to_str()), template)
    source_tokenizer = Tokenizer.from_str(tokenizer.to_str())  # as the source encodes a whole text
    task, steps = "What is 12 + 30? Answer in one line.", (
        Step("", "Step 1: 12 + 30 = 42."), Step("", "Step 2: The answer is 42."), Step("", "So it is 42."))
    rendered = renderer.render_steps(task, steps)
    task_format = template.task_format[1:] if template.strip_added_space else template.task_format
    text = template.preamble + task_format.replace("{text}", task) + template.task_suffix
    for t, step in enumerate(steps):
        text += (template.step_prefix if t else "") + (template.first_step_format if t == 0 else
                                                       template.step_format).replace("{text}", step.action)
        text += template.step_tag + template.step_suffix
    whole = source_tokenizer.encode(text, add_special_tokens=False).ids
    if list(rendered.ids) == whole:
        return "segment-wise ids equal the whole-text ids on a probe trajectory"
    return ("WARNING: segment-wise ids differ from the whole-text ids on a probe trajectory (scores may differ "
            "slightly from the source's own code; see docs/ARCHITECTURE.md, 'Rendering')")


# -- the importer ------------------------------------------------------------------------------------------------
def _backbone_state(source: Source, base_prefix: str, extra_heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
    prefixes = [f"{w}{base_prefix}." for w in WRAPPER_PREFIXES] + [f"{base_prefix}.", *WRAPPER_PREFIXES]
    dropped = tuple(f"{w}{h}" for w in ("", *WRAPPER_PREFIXES) for h in (*HEAD_PREFIXES, *extra_heads))
    state = {}
    for name, tensor in source.tensors.items():
        if name.startswith(dropped):
            continue
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        state[name] = tensor
    return state


def import_value_model(src: Path | str, out: Path | str, *, name: str, version: str = "1", kind: str = "auto",
                       activation: str | None = None, max_seq_len: int | None = None, overwrite: bool = False,
                       step_separator: str = "\n", system_prompt: str | None = None) -> Imported:
    """Convert the model folder `src` into a checkpoint at `out`; `kind="auto"` detects the family."""
    src = Path(src)
    source = read_source(src)
    if kind == "auto":
        kind, reason = detect_kind(source)
        detected = True
    elif kind not in KINDS:
        raise CheckpointError(f"unknown importer kind {kind!r}; expected auto or one of {', '.join(KINDS)}")
    else:
        detected, reason = False, "forced with --kind"

    try:
        backbone = build_backbone(source.config)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{src / 'config.json'}: cannot build the backbone ({exc})") from None
    hidden = backbone.config.hidden_size
    head, spec = build_head(source, kind, hidden, activation)
    extra = (f"{source.config['value_head_prefix']}.",) if source.config.get("value_head_prefix") else ()
    state = _backbone_state(source, getattr(backbone, "base_model_prefix", "model") or "model", extra)
    # Tensors the backbone does not use (a wrapper's extras) are dropped; missing ones or wrong shapes refuse.
    expected = backbone.state_dict()
    load_weights(backbone, {k: v for k, v in state.items() if k in expected}, src)

    tokenizer = source.tokenizer
    check = "marker template: no source format to compare"
    if kind in ("qwen-prm", "skywork", "trl-prm", "math-shepherd", "rlhflow"):
        template = native_template(source, kind, step_separator, system_prompt)
        check = tokenization_check(tokenizer, template)
    else:
        template = Template()
        missing = [m for m in template.markers() if tokenizer.token_to_id(m) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        vocab = tokenizer.get_vocab_size()
        embeddings = backbone.get_input_embeddings()
        if vocab > embeddings.weight.shape[0]:
            old = embeddings.weight.data
            backbone.resize_token_embeddings(vocab)
            with torch.no_grad():
                backbone.get_input_embeddings().weight[old.shape[0]:] = old.mean(dim=0)
    tok_config = {k: v for k, v in source.tokenizer_config.items()
                  if k in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template", "add_bos_token")}
    training = TrainingInfo(method=f"imported:{kind}", data={"source": str(src.resolve()), "detected": reason})
    manifest = save_checkpoint(out, name=name, version=version, backbone=backbone, value_head=head,
                               tokenizer=tokenizer, template=template, training=training, head_spec=spec,
                               max_seq_len=max_seq_len or int(source.config.get("max_position_embeddings", 2048)),
                               overwrite=overwrite, tokenizer_config=tok_config)
    return Imported(manifest, kind, detected, reason, check)
