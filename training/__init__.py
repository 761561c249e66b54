"""AgentPRM training: trajectory data, labellers (td_gae, pvm, orm, mc), trainer, export to model_store.

Modules, in the order data flows through them:
- `training.data`: the JSONL trajectory format, validation (errors name the line), data hash, the grouping
  that defines the initial-value target, the validation split.
- `training.labels`: targets as pure tensor functions (TD + GAE, PVM, ORM masks) and the Monte-Carlo
  labeller over `envs.base.TextEnv` (with environment-step counting).
- `training.defaults`: method names and the default model size (cheap to import).
- `training.losses`: L_Q, L_A and the per-method loss on a batch of readout predictions.
- `training.backbone`: the PRM to train (default config, config JSON, Hugging Face folder, checkpoint).
- `training.trainer`: AdamW + warmup/cosine, clipping, validation + early stopping, DDP, progress.
- `training.export`: the model_store checkpoint with the training record in its manifest.
- `training.cli`: `agentprm train` (and `python -m training.cli train`).
"""
