"""`agentprm train`: a JSONL file of trajectories in, a served-as-is model_store checkpoint out.

    agentprm train --data FILE.jsonl --method agentprm|pvm|orm|mc --out DIR [--init CONFIG_JSON|HF_DIR|CKPT]
                   [--epochs --lr --beta --gamma --lam --batch-size --seed --max-seq-len --layers --hidden
                    --name --version --mc-rollouts K --mc-env --mc-policy --workers ...]

`register(subparsers)` adds the subcommand to service/cli.py's parser; `python -m training.cli train ...`
runs it standalone. Several processes (DDP): `torchrun --nproc-per-node N -m training.cli train ...`
(gloo on CPU, nccl on GPU); rank 0 labels (mc), logs and exports.

MC labelling rebuilds each trajectory's episode from meta: `--mc-env auto` maps meta.env "babyai" to
`envs.babyai.BabyAITextEnv(meta.level)`; `--mc-env MODULE:FACTORY` calls FACTORY(meta) for any other
`envs.base.TextEnv`. `--mc-policy data` (default) rolls out the policy that made the trajectory (meta.policy,
meta.epsilon through `envs.policies.make_policy`); expert|noisy|random pick one; MODULE:FACTORY calls
FACTORY(meta). User errors (bad data line, bad --init) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shlex
import sys
from pathlib import Path

from training.defaults import DEFAULT_SIZE, METHODS
from training.scale import StreamedData, add_scale_arguments, scale_config

EXIT_USER_ERROR = 2


def _import_attr(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not MODULE:NAME")
    return getattr(importlib.import_module(module_name), attr)


class EnvFactory:
    """meta -> TextEnv (picklable, for labelling workers)."""

    def __init__(self, spec: str = "auto"):
        self.spec = spec

    def __call__(self, meta: dict):
        if self.spec != "auto":
            return _import_attr(self.spec)(meta)
        if meta.get("env") == "babyai":
            from envs.babyai import BabyAITextEnv

            return BabyAITextEnv(meta["level"])
        raise ValueError(f"no environment known for meta.env={meta.get('env')!r}; pass --mc-env MODULE:FACTORY")


class PolicyFactory:
    """meta -> Policy (picklable, for labelling workers)."""

    def __init__(self, spec: str = "data", epsilon: float = 0.2, seed: int = 0):
        self.spec, self.epsilon, self.seed = spec, epsilon, seed

    def __call__(self, meta: dict):
        if ":" in self.spec:
            return _import_attr(self.spec)(meta)
        from envs.policies import make_policy

        if self.spec == "data":
            return make_policy(str(meta.get("policy", "random")), float(meta.get("epsilon", self.epsilon)), self.seed)
        return make_policy(self.spec, self.epsilon, self.seed)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL trajectories: {task, steps: [{observation, action}], "
                                                 "reward, meta}")
    p.add_argument("--method", required=True, choices=METHODS, help="agentprm (TD+GAE, L_Q + beta L_A), "
                   "pvm (outcome at every step), orm (final step only), mc (Math-Shepherd rollout labels)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (e.g. STORE/name/version)")
    p.add_argument("--init", default=None, help="config JSON (from scratch), Hugging Face model folder "
                   "(fine-tune; safetensors only) or AgentPRM checkpoint; default: a small Qwen2 and a tokenizer "
                   "trained on the data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 from scratch, 1e-4 "
                   "continuing an AgentPRM checkpoint, 2e-5 fine-tuning a Hugging Face model)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps for linear warmup")
    p.add_argument("--beta", type=float, default=1.0, help="weight of L_A (agentprm)")
    p.add_argument("--gamma", type=float, default=1.0, help="discount of the outcome per step (agentprm TD targets; pvm "
                   "and orm discount the outcome to each step the same way; recorded in the manifest)")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda (agentprm)")
    p.add_argument("--batch-size", type=int, default=16, help="trajectories per optimizer step (global)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per micro-batch")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of initial states held out")
    p.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping")
    p.add_argument("--min-train-fraction", type=float, default=0.5,
                   help="share of the planned steps before early stopping may fire [default: 0.5]")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: every epoch)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=2048, help="longer trajectories are skipped (and counted)")
    p.add_argument("--layers", type=int, default=None, help=f"default model: {DEFAULT_SIZE['layers']}")
    p.add_argument("--hidden", type=int, default=None, help=f"default model: {DEFAULT_SIZE['hidden']}")
    p.add_argument("--vocab", type=int, default=None, help=f"tokenizer trained on the data: {DEFAULT_SIZE['vocab']}")
    p.add_argument("--success-above", type=float, default=0.0, help="reward above this counts as success")
    p.add_argument("--name", default=None,
                   help="model name in the manifest (default: agentprm, or METHOD-prm for a baseline)")
    p.add_argument("--version", default="1")
    p.add_argument("--mc-rollouts", type=int, default=4, help="K rollouts per step (mc)")
    p.add_argument("--mc-env", default="auto", help="auto (meta.env babyai) or MODULE:FACTORY(meta)")
    p.add_argument("--mc-policy", default="data", help="data | expert | noisy | random | MODULE:FACTORY(meta)")
    p.add_argument("--mc-epsilon", type=float, default=0.2, help="epsilon of the noisy rollout policy")
    p.add_argument("--workers", type=int, default=1, help="processes for MC labelling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on a GPU and on a CPU whose bf16 matmuls measure faster than fp32 "
                   "(weights, targets, loss and value head stay fp32), else fp32")
    p.add_argument("--dist-init", default="env://", help="torch.distributed init method when WORLD_SIZE > 1: "
                   "env:// (torchrun's MASTER_ADDR/PORT) or file:///shared/path (no rendezvous port)")
    p.add_argument("--log", default=None, help="also write per-step metrics as JSON lines here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true")
    add_scale_arguments(p)


def default_lr(init_source: str) -> float:
    """Pretrained weights move little (fine-tuning); a small model from scratch takes a large step."""
    if init_source.startswith("hf:"):
        return 2e-5
    return 1e-4 if init_source.startswith("checkpoint:") else 1e-3


def default_name(method: str) -> str:
    return "agentprm" if method == "agentprm" else f"{method}-prm"


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a PRM on a JSONL file of trajectories and export a checkpoint")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)


def command_line(argv: list[str] | None) -> str:
    if argv is None:  # run as `python -m training.cli`, or through the agentprm entry point
        standalone = Path(sys.argv[0]).as_posix().endswith("training/cli.py")
        return f"{'python -m training.cli' if standalone else 'agentprm'} {shlex.join(sys.argv[1:])}"
    return f"agentprm {shlex.join(argv)}"


def _device(name: str, local_rank: int):
    from model_store.modeling import pick_device

    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        import torch

        device = torch.device("cuda", local_rank)
    return device


def run_train(args, command: str) -> dict:
    """The whole `train` command; returns the summary printed at the end."""
    from model_store.render import Renderer
    from training import data as data_mod
    from training.backbone import initialize
    from training.export import export_checkpoint, training_info
    from training.labels import mc_labels
    from training.trainer import TrainConfig, Trainer, broadcast_object, init_distributed, make_examples

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    info = init_distributed(args.device, args.dist_init)
    streamed = None
    if args.stream:
        if args.method == "mc":
            raise ValueError("--stream does not support --method mc (labelling reads every trajectory)")
        streamed = StreamedData.open(args.data, args.val_fraction, args.seed)
        needs_corpus = args.init is None or Path(args.init).is_file()  # a tokenizer is trained on the data
        corpus = streamed.corpus() if needs_corpus else ""
        base_rate = streamed.index.summary(streamed.train_indices, args.success_above)["success_rate"]
        records = train_records = val_records = []
    else:
        records = data_mod.load_jsonl(args.data)
        train_records, val_records = data_mod.split_by_group(records, args.val_fraction, args.seed)
        corpus = data_mod.corpus_text(records)
        base_rate = data_mod.data_summary(train_records, args.success_above)["success_rate"]
    init = initialize(args.init, corpus, args.max_seq_len, base_rate=base_rate,
                      seed=args.seed, layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    renderer = Renderer(init.tokenizer, init.template)
    labelling = {"env_steps": 0, "source": "recorded outcomes"}
    train_labels = val_labels = None
    if args.method == "mc":
        result = None
        if info.main:
            mc = mc_labels(records, EnvFactory(args.mc_env), PolicyFactory(args.mc_policy, args.mc_epsilon, args.seed),
                           k=args.mc_rollouts, success_above=args.success_above, workers=args.workers,
                           source=str(args.data), progress=not args.no_progress)
            result = (mc.labels, mc.env_steps, mc.rollouts)
        labels, env_steps, rollouts = broadcast_object(result, info)
        by_id = {id(r): lab for r, lab in zip(records, labels)}
        train_labels = [by_id[id(r)] for r in train_records]
        val_labels = [by_id[id(r)] for r in val_records]
        labelling = {"env_steps": env_steps, "rollouts": rollouts, "rollouts_per_step": args.mc_rollouts,
                     "env": args.mc_env, "policy": args.mc_policy, "source": "monte-carlo rollouts"}
    if streamed is not None:
        train_ex, val_ex, skipped = streamed.examples(renderer, args.max_seq_len, args.gamma)
    else:
        train_ex, skipped_train = make_examples(train_records, renderer, args.max_seq_len,
                                                data_mod.initial_value_targets(train_records, args.gamma), train_labels)
        val_ex, skipped_val = make_examples(val_records, renderer, args.max_seq_len,
                                            data_mod.initial_value_targets(val_records, args.gamma), val_labels)
        skipped = skipped_train + skipped_val
    if skipped and info.main:
        print(f"agentprm: note: skipped {len(skipped)} trajectories longer than --max-seq-len {args.max_seq_len} "
              f"tokens (lines {', '.join(map(str, skipped[:10]))}{', ...' if len(skipped) > 10 else ''})",
              file=sys.stderr)
    if not train_ex:
        raise data_mod.DataError(f"{args.data}: every training trajectory is longer than --max-seq-len "
                                 f"{args.max_seq_len} tokens")
    lr = default_lr(init.source) if args.lr is None else args.lr
    config = TrainConfig(method=args.method, epochs=args.epochs, lr=lr, weight_decay=args.weight_decay,
                         warmup=args.warmup, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                         grad_clip=args.grad_clip, beta=args.beta, gamma=args.gamma, lam=args.lam,
                         patience=args.patience, min_train_fraction=args.min_train_fraction,
                         eval_every=args.eval_every, max_steps=args.max_steps,
                         precision=args.precision,
                         seed=args.seed, success_above=args.success_above, progress=not args.no_progress,
                         log_path=args.log)
    pad_id = init.model.backbone.config.pad_token_id or 0
    scale = scale_config(args, init.tokenizer, init.template)
    trainer = Trainer(init.model, config, pad_id, _device(args.device, info.local_rank), info, scale)
    config.precision = trainer.precision  # the manifest records what ran ("auto" resolved on this machine)
    result = trainer.fit(train_ex, val_ex)
    summary = {"out": str(out), "method": args.method, "steps": result.steps,
               "tokens_per_s": round(result.tokens_per_s, 1), "val": result.best,
               "labelling_env_steps": labelling["env_steps"], "world_size": info.world}
    model = None if result.interrupted else trainer.export_model()  # a collective under FSDP
    if result.interrupted:
        summary["interrupted"] = str(scale.checkpoint_dir)
    elif info.main:
        summary_fields = streamed.index.summary(None, args.success_above) if streamed is not None else \
            data_mod.data_summary(records, args.success_above)
        data = {"path": str(args.data), "sha256": data_mod.file_sha256(args.data),
                "n_trajectories": summary_fields["n_trajectories"],
                "n_train": len(train_ex), "n_val": len(val_ex), "skipped_lines": skipped,
                **{k: v for k, v in summary_fields.items() if k != "n_trajectories"}}
        training = training_info(config, result, data, labelling, command, init.source)
        training = training.model_copy(update={"world_size": info.world, "scale": dataclasses.asdict(scale)})
        manifest = export_checkpoint(out, model, init.tokenizer, init.template,
                                     name=args.name or default_name(args.method), version=args.version,
                                     max_seq_len=args.max_seq_len, training=training, overwrite=args.overwrite)
        summary["ref"] = manifest.ref
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def _json_safe(value):
    """NaN (an AUC with one class) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value


def cmd_train(args, argv: list[str] | None = None) -> int:
    from model_store.store import CheckpointError
    from training.backbone import InitError
    from training.data import DataError

    try:
        summary = run_train(args, command_line(argv))
    except (DataError, InitError, CheckpointError, FileExistsError, ValueError) as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if "interrupted" in summary:
        print(f"stopped after {summary['steps']} steps (--stop-after); continue with --resume "
              f"--checkpoint-dir {summary['interrupted']}")
        print(json.dumps(_json_safe(summary), default=str))
    if "ref" in summary:
        val = summary["val"]
        metrics = ", ".join(f"val {k} {val[k]:.4f}" for k in ("auc", "brier", "loss") if isinstance(val.get(k), float))
        print(f"wrote {summary['ref']} to {summary['out']}: {summary['steps']} steps, "
              f"{summary['tokens_per_s']:.0f} tokens/s, labelling env steps {summary['labelling_env_steps']}"
              + (f", {metrics}" if metrics else ""))
        print(json.dumps(_json_safe(summary), default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cli", description="AgentPRM training")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return cmd_train(args, argv)


if __name__ == "__main__":
    sys.exit(main())
