"""The trainer: one PRM code path with serving, AdamW + warmup/cosine, clipping, early stopping, DDP.

Examples are rendered once with the serving `Renderer` (template from the manifest), so training reads the
promise at exactly the token the service reads. A batch is right-padded with no attention mask: under
causal attention real tokens only see earlier real tokens, and pad positions are never read (the runner's
argument), so a padded batch gives each trajectory the promises it gets alone.

One optimizer step = one global batch of `batch_size` trajectories, drawn from a per-epoch permutation
seeded by (seed, epoch). With DDP (WORLD_SIZE > 1, gloo on CPU, nccl on GPU) process r takes every
world-th trajectory of the global batch; each process splits its share into micro-batches under
`max_batch_tokens` padded tokens. The loss of every micro-batch is its (sum, count) terms divided by the
counts of the whole global batch (known before any forward pass), scaled by the world size to undo DDP's
gradient averaging: the accumulated gradient is the gradient of the global batch's mean loss whatever
the split, so 2 processes follow the loss curve of 1 (up to float summation order). A final global batch
smaller than the world size is dropped.

Validation (every `eval_every` steps, else every epoch) reports the method's loss and, method-agnostic,
`auc` (final-step promise ranks successes above failures), `brier` (mean squared error of the final-step
promise against the outcome) and `v0_mse`. Early stopping watches `brier` (lower is better; every method
trains the final step toward the outcome, so it compares methods fairly): after `patience` evaluations
without improvement training stops, but never before `min_train_fraction` of the planned steps (small models
often sit on a plateau first), and the best weights are restored. Every process evaluates the whole
validation set (identical results, identical stopping decisions).

Precision (`precision`, training.precision): fp32, or fp32 weights with bf16 autocast for the backbone's
matmuls ("auto": on a GPU, and on a CPU whose bf16 matmuls measure faster than fp32); the value head's
output, the targets and the loss stay fp32. Seeds: python, numpy, torch.

At scale (`ScaleConfig`, training/sharding.py): FSDP2 shards instead of DDP replicas (bf16 precision: the
decoder layers compute in bf16), LoRA adapters (training/lora.py), activation checkpointing, token-budget
global batches (training/streaming.py), training checkpoints and exact resume (training/checkpointing.py).
`train` may be any sequence of examples, such as the lazily rendered `streaming.StreamingExamples`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from model_store.modeling import PRMModel
from model_store.render import Renderer
from training.data import Record
from training.losses import batch_loss_terms, term_counts
from training.precision import resolve_precision
from training.sharding import ScaleConfig


CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


# -- configuration and data ----------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    method: str = "agentprm"
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of the optimizer steps spent warming up linearly
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    batch_size: int = 16  # trajectories per optimizer step (global, across processes)
    max_batch_tokens: int = 16384  # padded tokens per micro-batch per process
    grad_clip: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    patience: int = 5
    min_train_fraction: float = 0.5  # early stopping never fires before this share of the planned steps
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    precision: str = "fp32"  # fp32 | bf16 | auto (training.precision)
    max_steps: int | None = None
    seed: int = 0
    success_above: float = 0.0
    progress: bool = True
    log_path: str | None = None


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    readouts: tuple[int, ...]  # the state readout (V_0), then one per step
    outcome: float
    initial_target: float
    labels: tuple[float, ...] | None = None  # per-step MC labels
    line: int = 0


def make_examples(records: list[Record], renderer: Renderer, max_seq_len: int, initial_targets: list[float],
                  labels: list[list[float]] | None = None) -> tuple[list[Example], list[int]]:
    """Rendered examples, and the lines of trajectories skipped for rendering to more than max_seq_len tokens."""
    examples, skipped = [], []
    for i, record in enumerate(records):
        rendered = renderer.render(record.trajectory())
        if len(rendered.ids) > max_seq_len:
            skipped.append(record.line)
            continue
        examples.append(Example(rendered.ids, rendered.readouts, record.reward, initial_targets[i],
                                tuple(labels[i]) if labels is not None else None, record.line))
    return examples, skipped


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] right-padded
    flat_index: torch.Tensor  # [N] readout positions in the flattened [B*T]
    readout_mask: torch.Tensor  # [B, R] True at real readouts (V_0, Q_0..)
    outcome: torch.Tensor  # [B]
    initial_target: torch.Tensor  # [B]
    labels: torch.Tensor | None  # [B, R-1]
    tokens: int  # real tokens

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.ids), move(self.flat_index), move(self.readout_mask), move(self.outcome),
                     move(self.initial_target), move(self.labels), self.tokens)


def collate(examples: list[Example], pad_id: int) -> Batch:
    length = max(len(e.ids) for e in examples)
    width = max(len(e.readouts) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    flat = []
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[b, : len(e.readouts)] = True
        flat.extend(b * length + r for r in e.readouts)  # row-major, the order masked_scatter fills
    labels = None
    if examples[0].labels is not None:
        labels = torch.zeros((len(examples), width - 1))
        for b, e in enumerate(examples):
            labels[b, : len(e.labels)] = torch.tensor(e.labels)
    return Batch(ids, torch.tensor(flat, dtype=torch.long), mask,
                 torch.tensor([e.outcome for e in examples], dtype=torch.float32),
                 torch.tensor([e.initial_target for e in examples], dtype=torch.float32),
                 labels, sum(len(e.ids) for e in examples))


def micro_batches(examples: list[Example], max_batch_tokens: int) -> list[list[Example]]:
    """Length-sorted groups with padded size B * T_max <= max_batch_tokens (a longer example goes alone)."""
    groups, current = [], []
    for e in sorted(examples, key=lambda e: len(e.ids)):
        if current and (len(current) + 1) * len(e.ids) > max_batch_tokens:
            groups.append(current)
            current = []
        current.append(e)
    if current:
        groups.append(current)
    return groups


def roc_auc(scores: list[float], positives: list[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN without both classes."""
    pos = sum(positives)
    neg = len(positives) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[np.asarray(positives, dtype=bool)].sum()
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


# -- distributed ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


# Rank 0 alone labels (MC rollouts) while the other ranks wait in a broadcast: far longer than the default
# group's timeout (NCCL: 10 minutes). Objects travel on a gloo group of their own with this timeout instead.
CONTROL_TIMEOUT = datetime.timedelta(hours=24)
_control_group = None


def init_distributed(device: str = "auto", init_method: str = "env://",
                     timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    gloo on CPU, nccl on GPU. A single process (no WORLD_SIZE, or 1) needs no process group. `init_method`
    "env://" meets at MASTER_ADDR:MASTER_PORT (torch's TCP store, which listens on every interface);
    "file:///shared/path" meets through a file instead and opens no rendezvous port.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank, world_size=world,
                                **({"timeout": timeout} if timeout is not None else {}))
    _make_control_group()
    return DistInfo(rank, world, local_rank)


def _make_control_group() -> None:
    """A gloo group beside the default one (collective: every rank calls it once), for objects and waits."""
    global _control_group
    import torch.distributed as dist

    default = dist.distributed_c10d._get_default_group()
    if _control_group is None or _control_group[0] is not default:  # none yet, or made for a destroyed group
        _control_group = (default, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))


def _control() -> "object | None":
    """The control group of the current default group, or None (the default group) when none was made for it."""
    import torch.distributed as dist

    if _control_group is None or _control_group[0] is not dist.distributed_c10d._get_default_group():
        return None
    return _control_group[1]


def collective_device(group=None) -> torch.device:
    """Where a tensor for a collective on `group` must live, read from the group's backend: NCCL reduces only
    CUDA tensors (on the current device), gloo (and a "cpu:gloo,cuda:nccl" pair) takes CPU tensors."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def broadcast_object(obj, info: DistInfo):
    """`obj` of rank 0 on every process, over the gloo control group (CPU, long timeout: rank 0 may be busy
    labelling for hours while the others wait here)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if info.main else None]
    dist.broadcast_object_list(box, src=0, group=_control())
    return box[0]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# -- the trainer ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # validation metrics of the restored weights
    steps: int = 0
    epochs_run: int = 0
    stopped_early: bool = False
    tokens: int = 0
    train_seconds: float = 0.0
    interrupted: bool = False  # stopped by ScaleConfig.stop_after, to be resumed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


class Trainer:
    def __init__(self, model: PRMModel, config: TrainConfig, pad_id: int, device: torch.device | str = "cpu",
                 dist_info: DistInfo = DistInfo(), scale: ScaleConfig | None = None):
        from training import sharding

        self.config = config
        self.info = dist_info
        self.device = torch.device(device)
        self.pad_id = pad_id
        self.scale = scale or ScaleConfig()
        self.scale.check()
        if self.scale.lora_rank:
            from training.lora import add_lora

            add_lora(model, self.scale.lora_rank, self.scale.lora_alpha, trainable_token_ids=self.scale.lora_token_ids)
        if self.scale.activation_checkpointing:
            sharding.apply_activation_checkpointing(model)
        self.model = model.to(self.device)  # the module evaluated and exported (sharded in place under FSDP)
        # every process computes in rank 0's choice ("auto" times a matmul; ranks must not disagree)
        self.precision = broadcast_object(resolve_precision(config.precision, self.device), dist_info)
        self.ddp: nn.Module = self.model
        self.sharded = dist_info.enabled and self.scale.parallel == "fsdp"
        if self.sharded:
            sharding.shard_model(self.model, self.precision)
        elif dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)  # broadcasts rank 0's weights

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, examples: list[Example]) -> list[np.ndarray]:
        """Promises at every readout [V_0, Q_0, ...] of each example (the evaluation forward)."""
        was_training = self.model.training
        self.model.eval()
        out: list[np.ndarray | None] = [None] * len(examples)
        position = {id(e): i for i, e in enumerate(examples)}
        try:
            for group in micro_batches(examples, self.config.max_batch_tokens):
                batch = collate(group, self.pad_id).to(self.device)
                with self.autocast():
                    promises = self.model(batch.ids, None, batch.flat_index).float().cpu().numpy()
                splits = np.split(promises, np.cumsum([len(e.readouts) for e in group])[:-1])
                for e, values in zip(group, splits):
                    out[position[id(e)]] = values
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> dict:
        if not examples:
            return {}
        c = self.config
        predictions = self.predict(examples)
        q_sum = a_sum = q_count = a_count = 0.0
        for group_start in range(0, len(examples), 256):
            group = examples[group_start: group_start + 256]
            batch = collate(group, self.pad_id)
            pred = torch.zeros(batch.readout_mask.shape).masked_scatter(
                batch.readout_mask, torch.from_numpy(np.concatenate(predictions[group_start: group_start + 256])))
            terms = batch_loss_terms(c.method, pred, batch.readout_mask, batch.outcome, batch.initial_target,
                                     batch.labels, c.gamma, c.lam)
            q_sum, a_sum = q_sum + float(terms.q_sum), a_sum + float(terms.a_sum)
            q_count, a_count = q_count + float(terms.q_count), a_count + float(terms.a_count)
        final = [float(p[-1]) for p in predictions]
        success = [e.outcome > c.success_above for e in examples]
        l_q = q_sum / max(q_count, 1.0)
        l_a = a_sum / a_count if a_count else 0.0
        return {"loss": l_q + c.beta * l_a if c.method == "agentprm" else l_q, "l_q": l_q, "l_a": l_a,
                "auc": roc_auc(final, success),
                "brier": float(np.mean([(f - e.outcome) ** 2 for f, e in zip(final, examples)])),
                "v0_mse": float(np.mean([(float(p[0]) - e.initial_target) ** 2
                                         for p, e in zip(predictions, examples)])),
                "n": len(examples)}

    # -- training ----------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.config.lr, betas=(0.9, 0.95))

    def _schedule(self, optimizer, total_steps: int):
        warmup = max(1, math.ceil(self.config.warmup * total_steps)) if self.config.warmup > 0 else 0
        floor = self.config.min_lr_ratio

        def factor(step: int) -> float:  # step counts finished optimizer steps
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def steps_per_epoch(self, n_train: int) -> int:
        full, rest = divmod(n_train, self.config.batch_size)
        return full + (1 if rest >= self.info.world else 0)

    def epoch_batches(self, train, epoch: int) -> list[list[int]]:
        """The global batches (indices into `train`) of one epoch: a permutation seeded by (seed, epoch), cut
        every `batch_size` trajectories, or by `batch_tokens` real tokens when that is set."""
        from training.streaming import plan_batches

        lengths = train.lengths if hasattr(train, "lengths") else [len(e.ids) for e in train]
        return plan_batches(lengths, self.config.batch_size, self.scale.batch_tokens, self.config.seed, epoch,
                            self.info.world)

    def _accumulating(self, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
        if sync or not self.info.enabled:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self.model)
        return self.ddp.no_sync()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the weights training changes (all of them, or a LoRA run's adapters and head)."""
        self.reshard()
        # state_dict names (activation checkpointing's wrappers hide their prefix there, not in named_parameters)
        return {n.replace(CHECKPOINT_PREFIX, ""): _local(p).detach().to("cpu", copy=True)  # FSDP: this rank's shard
                for n, p in self.model.named_parameters() if p.requires_grad}

    def reshard(self) -> None:
        """FSDP: free gathered weights, so the registered parameters are the shards again. A forward without a
        backward (evaluation) leaves the root group gathered; reading or writing weights then would touch
        the gathered copy instead of the shards."""
        if self.sharded:
            for module in self.model.modules():
                if hasattr(module, "reshard"):
                    module.reshard()

    def export_model(self) -> PRMModel | None:
        """The trained PRM as a plain module (shards gathered, adapters merged, no checkpoint wrappers) on the
        main process, None on the others. A collective under FSDP: every process must call it."""
        from training import sharding
        from training.lora import merge_lora

        self.reshard()
        if self.sharded:
            from training.backbone import build_backbone

            state = sharding.full_state_dict(self.model, sharded=True)
            if not self.info.main:
                return None
            config = self.model.backbone.config.to_dict()
            plain = PRMModel(build_backbone(config), activation=self.model.activation)
            plain.load_state_dict(state, strict=True)
            return plain
        if not self.info.main:
            return None
        return merge_lora(sharding.remove_activation_checkpointing(self.model)).to("cpu")

    def _step(self, global_batch: list[Example], optimizer, scheduler) -> dict:
        c, info = self.config, self.info
        mask = collate(global_batch, self.pad_id).readout_mask
        q_total, a_total = term_counts(c.method, mask)
        local = global_batch[info.rank:: info.world]
        groups = micro_batches(local, c.max_batch_tokens)
        real = len(groups)
        if self.sharded:  # every forward gathers weights collectively: all processes must run as many
            groups += [groups[0][:1]] * (_max_over_processes(len(groups)) - len(groups))  # weighted 0 below
        # q_sum, a_sum, tokens of this process; on the device the default group reduces (NCCL: CUDA only)
        sums = torch.zeros(3, dtype=torch.float64, device=collective_device() if info.enabled else "cpu")
        for j, group in enumerate(groups):
            sync = j == len(groups) - 1 or not info.enabled
            with self._accumulating(sync):
                batch = collate(group, self.pad_id).to(self.device)
                with self.autocast():
                    flat = self.ddp(batch.ids, None, batch.flat_index)  # [N]
                pred = torch.zeros(batch.readout_mask.shape, device=self.device).masked_scatter(
                    batch.readout_mask, flat.float())  # [B, R]
                terms = batch_loss_terms(c.method, pred, batch.readout_mask, batch.outcome, batch.initial_target,
                                         batch.labels, c.gamma, c.lam)
                loss = terms.q_sum / q_total
                if a_total:
                    loss = loss + c.beta * terms.a_sum / a_total
                (loss * (info.world if j < real else 0.0)).backward()
            if j < real:
                sums += torch.tensor([terms.q_sum.item(), terms.a_sum.item(), batch.tokens], dtype=torch.float64,
                                     device=sums.device)
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], c.grad_clip))) if c.grad_clip > 0 else float("nan")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if info.enabled:
            import torch.distributed as dist

            dist.all_reduce(sums)
        l_q = float(sums[0]) / q_total
        l_a = float(sums[1]) / a_total if a_total else 0.0
        loss = l_q + c.beta * l_a if c.method == "agentprm" else l_q
        return {"loss": loss, "l_q": l_q, "l_a": l_a, "lr": lr, "grad_norm": grad_norm, "tokens": int(sums[2])}

    def fit(self, train, val: list[Example]) -> TrainResult:
        from tqdm import tqdm

        c, info = self.config, self.info
        if len(train) < info.world:
            raise ValueError(f"{len(train)} training trajectories cannot be split over {info.world} processes")
        if c.method == "mc" and train[0].labels is None:
            raise ValueError("method 'mc' needs Monte-Carlo labels on the examples")
        set_seed(c.seed)
        plans = [self.epoch_batches(train, epoch) for epoch in range(c.epochs)]
        total = sum(map(len, plans)) if c.max_steps is None else min(sum(map(len, plans)), c.max_steps)
        optimizer = self._optimizer()
        scheduler = self._schedule(optimizer, total)
        result = TrainResult()
        track = {"best_score": math.inf, "bad_evals": 0}  # early stopping (saved in training checkpoints)
        best_state: dict | None = None
        checkpointer = self._checkpointer()
        start_epoch = start_batch = 0
        if self.scale.resume:
            saved, best_state = checkpointer.load(self.model, optimizer, self._fingerprint(len(train)))
            scheduler.load_state_dict(saved["scheduler"])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
            start_epoch, start_batch = saved["epoch"], saved["batch"]
            track = saved["track"]
            track["best_score"] = math.inf if track["best_score"] is None else track["best_score"]
            result = TrainResult(**saved["result"])
        log = open(c.log_path, "a") if (c.log_path and info.main) else None
        bar = tqdm(total=total, initial=result.steps, desc=f"train {c.method}", unit="step",
                   disable=not (c.progress and info.main))
        self.model.train()

        def run_eval(epoch: int) -> bool:
            """Evaluate, keep the best weights; True when training should stop."""
            nonlocal best_state
            metrics = self.evaluate(val)
            entry = {"step": result.steps, "epoch": epoch, **{f"val_{k}": v for k, v in metrics.items()}}
            result.evals.append(entry)
            if log:
                log.write(json.dumps({"eval": entry}) + "\n")
                log.flush()
            if c.progress and info.main:
                bar.write(f"step {result.steps} epoch {epoch}: val loss {metrics['loss']:.4f} "
                          f"auc {metrics['auc']:.3f} brier {metrics['brier']:.4f}")
            if metrics["brier"] < track["best_score"] - 1e-6:
                track.update(best_score=metrics["brier"], bad_evals=0)
                best_state = self.trainable_state()
                result.best = {**metrics, "step": result.steps}
                return False
            track["bad_evals"] += 1
            # A small model often sits on a plateau (promises at the base rate) before it finds the signal;
            # stopping there would keep the plateau's weights, so patience only counts after a share of the run.
            return track["bad_evals"] >= c.patience and result.steps >= c.min_train_fraction * total

        def save_checkpoint(epoch: int, next_batch: int) -> None:
            self.reshard()
            if next_batch >= len(plans[epoch]):  # the epoch is done: resume at the next one
                epoch, next_batch = epoch + 1, 0
            checkpointer.save(result.steps, self.model, optimizer, {
                "epoch": epoch, "batch": next_batch, "scheduler": scheduler.state_dict(),
                "track": {**track, "best_score": None if math.isinf(track["best_score"]) else track["best_score"]},
                "result": dataclasses.asdict(result), "fingerprint": self._fingerprint(len(train))}, best_state)

        try:
            stop = False
            steps_this_run = 0
            for epoch in range(start_epoch, c.epochs):
                if stop or result.steps >= total:
                    break
                for b, indices in enumerate(plans[epoch]):
                    if epoch == start_epoch and b < start_batch:
                        continue  # done before the run was resumed
                    if result.steps >= total:
                        break
                    began = time.perf_counter()
                    stats = self._step([train[i] for i in indices], optimizer, scheduler)
                    elapsed = time.perf_counter() - began
                    result.steps += 1
                    steps_this_run += 1
                    result.tokens += stats["tokens"]
                    result.train_seconds += elapsed
                    entry = {"step": result.steps, "epoch": epoch, **stats, "tokens_per_s": stats["tokens"] / elapsed}
                    result.history.append(entry)
                    if log:
                        log.write(json.dumps(entry) + "\n")
                    bar.update(1)
                    postfix = {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}",
                               "tok/s": f"{result.tokens_per_s:.0f}"}
                    if result.evals:
                        postfix.update(val_auc=f"{result.evals[-1]['val_auc']:.3f}",
                                       val_brier=f"{result.evals[-1]['val_brier']:.4f}")
                    bar.set_postfix(postfix, refresh=False)
                    if val and c.eval_every and result.steps % c.eval_every == 0:
                        stop = run_eval(epoch)
                        if stop:
                            break
                    if val and not c.eval_every and b == len(plans[epoch]) - 1:
                        stop = run_eval(epoch)  # end of epoch, before a checkpoint that resumes past it
                    interrupted = self.scale.stop_after is not None and steps_this_run >= self.scale.stop_after
                    if checkpointer and ((self.scale.checkpoint_every and
                                          result.steps % self.scale.checkpoint_every == 0) or interrupted):
                        save_checkpoint(epoch, b + 1)
                    if interrupted and result.steps < total and not stop:
                        result.interrupted = True
                        return result
                    if stop:
                        break
                result.epochs_run = epoch + 1
            if val and (not result.evals or result.evals[-1]["step"] != result.steps):
                run_eval(result.epochs_run - 1)
            result.stopped_early = stop
        finally:
            bar.close()
            if log:
                log.close()
        if best_state is not None:
            self._load_trainable(best_state)
        elif not val:
            result.best = {}
        return result

    def _checkpointer(self):
        if not self.scale.checkpoint_dir:
            return None
        from training.checkpointing import Checkpointer

        return Checkpointer(self.scale.checkpoint_dir, self.scale.checkpoint_every, self.info.rank, self.info.world)

    def _fingerprint(self, n_train: int) -> dict:
        """What must match for a resume to continue the same run."""
        return {"world_size": self.info.world, "parallel": self.scale.parallel if self.info.enabled else "none",
                "lora_rank": self.scale.lora_rank, "n_train": n_train, "batch_tokens": self.scale.batch_tokens,
                "config": {k: v for k, v in dataclasses.asdict(self.config).items()
                           if k not in ("progress", "log_path")}}

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        self.reshard()
        params = {n.replace(CHECKPOINT_PREFIX, ""): p for n, p in self.model.named_parameters()}
        with torch.no_grad():
            for name, value in state.items():
                _local(params[name]).copy_(_local(value))  # FSDP: this rank's shard


def _max_over_processes(value: int) -> int:
    import torch.distributed as dist

    box = torch.tensor([value], device=collective_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box)


def _local(value: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the shard of a DTensor (FSDP), the tensor itself otherwise."""
    return value.to_local() if hasattr(value, "to_local") else value


def _full(value):
    """A plain tensor from a DTensor (FSDP's gradient norm), unchanged otherwise."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
