"""Names and sizes shared by the training modules and the CLI (imports nothing heavy: `agentprm --help` stays fast)."""

METHODS = ("agentprm", "pvm", "orm", "mc")

# The default from-scratch size (no --init): a 4-layer, 128-wide Qwen2 (~0.8M parameters plus embeddings)
# and a byte-level BPE of up to 1024 tokens trained on the data's own text.
DEFAULT_SIZE = {"layers": 4, "hidden": 128, "vocab": 1024}
