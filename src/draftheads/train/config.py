"""Training configuration: one dataclass per concern. Unknown keys fail loudly (a typo in a config
file must never silently train with a default)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .. import defaults
from ..errors import UserError


@dataclass
class ModelConfig:
    backbone: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    dtype: str | None = None
    num_heads: int = 4
    num_layers: int = 1
    head_type: str = "medusa"  # "medusa" (--method medusa1), "hydra" or "hydra++"
    dropout: float = 0.0  # Hydra heads: dropout before every block and the LM head while training
    grounded_residual: str = "projection"  # Hydra heads' first block: "projection" (Hydra's) or "hidden" (smaller)
    # Hydra++: the prefix layer reads fc([h_t, E(x_t+1)]) at each position, the hidden state with the token it
    # produced (EAGLE's pairing), instead of h_t alone
    prefix_token: bool = False
    lm_head: str = "own"  # "own" or "shared" (the backbone's output embedding, frozen)
    # VocabTrim: the heads predict the N most frequent output tokens (0 or None: the full vocabulary).
    # Full-vocabulary LM heads cost ~9x the drafting time and ~10x the file for SmolLM2 (docs/results.md, "VocabTrim").
    trim_vocab: int | None = 4096


@dataclass
class DataConfig:
    # conversations JSONL files or distilled directories; each is split into train / held-out on its own
    paths: list[str] = field(default_factory=list)
    max_length: int = 1024
    eval_fraction: float = 0.05
    train_tokens: int | None = None  # a seeded subset of the training split with ~N assistant tokens (data-size curves)
    # A distilled directory: only its first N finished shards (hidden states are computed for those only), so a
    # small machine can train on part of a large set without a feature pass over all of it.
    shards: int | None = None
    precompute_features: bool = False
    features_dir: str | None = None  # where precomputed features are cached (default: the output directory)
    # "bfloat16": the feature pass runs under bf16 autocast, ~3x faster on CPUs with BF16 instructions; the
    # features then differ from fp32 ones by ~1% (relative norm), well inside what heads tolerate.
    feature_dtype: str = "float32"


@dataclass
class OptimConfig:
    epochs: float = 2.0
    batch_size: int = 8  # sequences per step and process (online mode)
    feature_batch: int = 512  # positions per step and process (precomputed features)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of all steps
    decay: float = 0.8  # head k's loss weight: decay**k
    soft_targets: bool = False


@dataclass
class RunConfig:
    output: str = ""
    checkpoint_every: int = 200
    seed: int = 0
    threads: int = defaults.THREADS
    progress: bool = True
    save_dtype: str = "float16"  # half the float32 file; loading converts to the backbone's dtype


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Llama-family names


@dataclass
class JointConfig:
    """Medusa-2 (--method medusa2): a LoRA adapter on the backbone trained together with the heads
    (train/medusa2.py). Off for medusa1 and hydra."""
    enabled: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # or ["all-linear"]
    adapter_lr: float = 1e-4  # the adapter's peak LR; the heads keep optim.lr (higher: Medusa-2's recipe)
    heads_coefficient: float = 0.2  # lambda: loss = KL(original || tuned) + lambda * sum_k decay^k CE_k
    heads_warmup_epochs: float = 1.0  # stage 1: heads only (Medusa-1) on the frozen backbone, before the joint stage
    init_heads: str | None = None  # start from these Medusa-1 heads instead of a stage 1
    merge: bool = False  # also write the backbone with the adapter merged (<output>/merged)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    joint: JointConfig = field(default_factory=JointConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        parts = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(parts))
        if unknown:
            raise UserError(f"unknown config section(s): {', '.join(unknown)} (known: {', '.join(parts)})")
        kinds = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig, "joint": JointConfig}
        out = {}
        for name, sub in d.items():
            known = {f.name for f in fields(kinds[name])}
            bad = sorted(set(sub) - known)
            if bad:
                raise UserError(f"unknown key(s) in config section {name!r}: {', '.join(bad)}")
            out[name] = kinds[name](**sub)
        cfg = cls(**out)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        m, o = self.model, self.optim
        if m.lm_head not in ("own", "shared"):
            raise UserError(f"lm_head must be 'own' or 'shared', not {m.lm_head!r}")
        if m.head_type not in ("medusa", "hydra", "hydra++"):
            raise UserError(f"head_type must be medusa, hydra or hydra++, not {m.head_type!r}")
        if m.grounded_residual not in defaults.GROUNDED_RESIDUALS:
            raise UserError(f"grounded_residual must be {' or '.join(map(repr, defaults.GROUNDED_RESIDUALS))}, "
                            f"not {m.grounded_residual!r}")
        if m.head_type == "medusa" and m.grounded_residual != "projection":
            raise UserError("grounded_residual applies to Hydra heads (--method hydra or hydra++) only")
        if m.prefix_token and m.head_type != "hydra++":
            raise UserError("prefix_token applies to Hydra++ heads (--method hydra++) only")
        if not 0 <= m.dropout < 1:
            raise UserError("dropout must be in [0, 1)")
        if m.num_heads < 1 or m.num_layers < 1:
            raise UserError("num_heads and num_layers must be at least 1")
        if m.trim_vocab is not None and (m.trim_vocab < 0 or m.trim_vocab == 1):
            raise UserError("trim_vocab must be at least 2 (or 0: the full vocabulary)")
        if o.epochs <= 0 or o.lr <= 0 or not 0 < o.decay <= 1 or not 0 <= o.warmup < 1:
            raise UserError("need epochs > 0, lr > 0, 0 < decay <= 1, 0 <= warmup < 1")
        if self.run.save_dtype not in ("float32", "float16", "bfloat16"):
            raise UserError(f"save_dtype must be float32, float16 or bfloat16, not {self.run.save_dtype!r}")
        if self.data.shards is not None and self.data.shards < 1:
            raise UserError("shards must be at least 1")
        d = self.data
        if not 0 <= d.eval_fraction < 1 or d.max_length < 2 or (d.train_tokens is not None and d.train_tokens < 1):
            raise UserError("need 0 <= eval_fraction < 1, max_length >= 2 and train_tokens >= 1 (or none)")
        if o.batch_size < 1 or o.feature_batch < 1 or self.run.checkpoint_every < 1:
            raise UserError("batch_size, feature_batch and checkpoint_every must be at least 1")
        if not self.data.paths or not all(self.data.paths) or not self.run.output:
            raise UserError("training needs a conversations file (--data) and an output directory (--output)")
        j = self.joint
        if j.init_heads and not j.enabled:
            raise UserError("init_heads (--init-heads) starts Medusa-2's joint stage: it needs --method medusa2")
        if j.enabled and j.init_heads:
            from ..draftmodel import heads_dir

            heads_dir(j.init_heads)  # a one-line error now, not after the backbone loaded
        if j.enabled:
            if m.head_type != "medusa":
                raise UserError("medusa2 trains Medusa heads (head_type medusa)")
            if o.soft_targets:
                raise UserError("--soft-targets is for medusa1 and hydra: medusa2's backbone changes, so its heads "
                                "learn the data tokens")
            if j.lora_rank < 1 or j.lora_alpha <= 0 or not 0 <= j.lora_dropout < 1 or not j.lora_targets:
                raise UserError("LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1 and at least one target module")
            if j.adapter_lr <= 0 or j.heads_coefficient < 0 or j.heads_warmup_epochs < 0:
                raise UserError("need adapter_lr > 0, heads_coefficient >= 0 and heads_warmup_epochs >= 0")
