"""The typed run config: one YAML file + dotted `key=value` overrides -> a validated RunConfig.

Sections (one dataclass each): run, model, data, train, optim, parallel, checkpoint, logging, debug.
`model` names a preset and/or any ModelConfig field; vocab_size and mask_token_id are filled in from the
tokenizer at run time and may not be set here. `data` is the data pipeline's own DataConfig (validated by
it) plus the `BUILTIN_DATA` keys: with `build_default: true` the built-in corpus is built (once, cached)
under `default_root` and used as data.path.
Every error names the field it is about, e.g. "optim.lr: expected a number, got 'fast'".
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import ConfigError, reject_unknown_fields

PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
PARTITION_METHODS = ("parameters", "uniform", "type:Block")


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs/run"          # config.yaml, tensorboard/, checkpoints/ go here
    seed: int = 1234


@dataclass
class TrainSection:
    steps: int = 1000                  # optimizer steps
    micro_batch_size: int = 8          # sequences per rank per forward
    grad_accum: int = 1
    global_batch_size: int | None = None  # if set, must equal micro * grad_accum * data-parallel size
    precision: str = "fp32"            # bf16: bf16 compute, fp32 weights/master/grad accumulation
    activation_checkpointing: bool = False
    cuda_graphs: bool = False          # replay the blocks from CUDA graphs (model/train_graphs.py)
    grad_clip: float = 1.0
    eval_interval: int = 500           # 0 disables periodic evaluation
    eval_iters: int = 4                # global batches of the validation split per evaluation
    max_consecutive_nan: int = 5       # stop after this many non-finite steps in a row


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 1e-6
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 1000
    schedule: str = "cosine"
    fused: bool | None = None       # None/true: torch's fused AdamW (skips a bad step on the device); false: foreach


@dataclass
class ParallelSection:
    zero_stage: int = 1                # 1, 2, 3; pipeline parallelism: 1
    pipeline_stages: int = 1           # >1: DeepSpeed PipelineModule, one LayerSpec per block
    partition_method: str = "parameters"
    backend: str | None = None      # None: nccl on CUDA, gloo on CPU
    overlap_comm: bool | None = None   # ZeRO: reduce gradients during the backward pass (None: DeepSpeed's default)
    reduce_bucket_size: int | None = None   # ZeRO: elements per gradient reduction (None: DeepSpeed's 5e8)
    contiguous_gradients: bool | None = None   # ZeRO: copy each gradient into a bucket buffer (None: DeepSpeed's true)


@dataclass
class CheckpointSection:
    dir: str | None = None          # default: <run.out_dir>/checkpoints
    interval: int = 1000               # steps; 0: only at the end / on signals
    keep: int = 3                      # keep the last K complete checkpoints (0 keeps all)
    resume: str | None = None       # None, "auto" or a checkpoint folder (also: --resume)
    save_final: bool = True
    checksums: bool = True             # write checksums.json (sha256 of every file) with each checkpoint


@dataclass
class LoggingSection:
    log_interval: int = 10
    tensorboard: bool = True
    t_buckets: int = 5                 # loss by t in this many equal buckets of (0, 1]
    peak_flops_per_gpu: float | None = None  # None: looked up from the GPU name (absent on CPU)
    num_samples: int = 2               # decoded text samples per evaluation (0: none)
    sample_steps: int = 64
    profile_start: int | None = None   # torch.profiler trace of steps profile_start.. (one file per rank)
    profile_steps: int = 2


@dataclass
class DebugSection:
    """Fault injection used by the tests of the NaN policy and of interrupted checkpoints."""
    nan_at_steps: list = field(default_factory=list)   # make the loss NaN at these steps (counted from 1)
    crash_in_checkpoint_at_step: int | None = None  # exit hard mid-write of this step's checkpoint


SECTIONS = {"run": RunSection, "train": TrainSection, "optim": OptimSection, "parallel": ParallelSection,
            "checkpoint": CheckpointSection, "logging": LoggingSection, "debug": DebugSection}
FROM_TOKENIZER = ("vocab_size", "mask_token_id")
# trainer-owned keys of the data section (the rest is DataConfig's)
BUILTIN_DATA = {"build_default": False, "default_root": "data/builtin", "default_vocab_size": 4096,
                "default_max_bytes": None}


@dataclass
class RunConfig:
    run: RunSection
    model: dict            # {"preset": name, **ModelConfig field overrides}
    data: dict             # DataConfig fields + build_default
    train: TrainSection
    optim: OptimSection
    parallel: ParallelSection
    checkpoint: CheckpointSection
    logging: LoggingSection
    debug: DebugSection

    def to_dict(self) -> dict:
        return {name: (dict(getattr(self, name)) if name in ("model", "data")
                       else dataclasses.asdict(getattr(self, name)))
                for name in ("run", "model", "data", "train", "optim", "parallel", "checkpoint", "logging",
                             "debug")}

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.run.out_dir) / "checkpoints")

    # ---- the pieces other modules build from it ----
    def model_config(self, vocab_size: int, mask_token_id: int):
        """ModelConfig from the preset + field overrides, with the tokenizer's vocabulary."""
        from model.presets import config_from_fields
        return config_from_fields(self.model, vocab_size, mask_token_id)

    def builtin_data(self) -> dict:
        return {k: self.data.get(k, v) for k, v in BUILTIN_DATA.items()}

    def data_config(self, path: str | None = None):
        """DataConfig of the data section; `path` replaces data.path (the built-in dataset's folder)."""
        from data_pipeline.config import DataConfig
        d = {k: v for k, v in self.data.items() if k not in BUILTIN_DATA}
        if path is not None:
            d["path"] = str(path)
        try:
            return DataConfig.from_dict(d)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data: {e}") from e


# ------------------------------------------------------------------ typed parsing
def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _build_section(cls, raw: Any, name: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    reject_unknown_fields(cls, raw, name)
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in raw.items()})


def _check(cfg: RunConfig) -> None:
    def need(ok: bool, where: str, msg: str):
        if not ok:
            raise ConfigError(f"{where}: {msg}")

    t, o, p, c, lg = cfg.train, cfg.optim, cfg.parallel, cfg.checkpoint, cfg.logging
    for fld in ("steps", "micro_batch_size", "grad_accum"):
        need(getattr(t, fld) >= 1, f"train.{fld}", f"must be >= 1, got {getattr(t, fld)}")
    need(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {t.precision!r}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    need(t.eval_interval >= 0, "train.eval_interval", f"must be >= 0, got {t.eval_interval}")
    need(t.eval_iters >= 1, "train.eval_iters", f"must be >= 1, got {t.eval_iters}")
    need(t.max_consecutive_nan >= 1, "train.max_consecutive_nan", f"must be >= 1, got {t.max_consecutive_nan}")
    need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    need(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
         "optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    need(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}, got {o.schedule!r}")
    # stage 0 is left out: its plain optimizer step has no global non-finite check, which the NaN policy needs
    need(p.zero_stage in (1, 2, 3), "parallel.zero_stage", f"must be 1, 2 or 3, got {p.zero_stage}")
    need(p.pipeline_stages >= 1, "parallel.pipeline_stages", f"must be >= 1, got {p.pipeline_stages}")
    need(p.pipeline_stages == 1 or p.zero_stage == 1, "parallel.zero_stage",
         f"pipeline parallelism (parallel.pipeline_stages={p.pipeline_stages}) supports ZeRO stage 1 only "
         f"(DeepSpeed refuses 2 and 3), got {p.zero_stage}")
    if t.cuda_graphs:   # the graphs replay fixed parameters with the whole backward recorded
        off = "; add train.cuda_graphs=false to use it"
        need(not t.activation_checkpointing, "train.cuda_graphs",
             "cannot be combined with train.activation_checkpointing (recomputation inside a recorded backward)"
             + off)
        need(p.zero_stage in (1, 2), "train.cuda_graphs",
             f"needs parallel.zero_stage 1 or 2 (ZeRO-3 gathers parameters on the fly), got {p.zero_stage}{off}")
    need(p.partition_method in PARTITION_METHODS, "parallel.partition_method",
         f"must be one of {PARTITION_METHODS}, got {p.partition_method!r}")
    need(p.backend in (None, "nccl", "gloo"), "parallel.backend", f"must be nccl or gloo, got {p.backend!r}")
    need(p.reduce_bucket_size is None or p.reduce_bucket_size >= 1, "parallel.reduce_bucket_size",
         f"must be >= 1 (or null), got {p.reduce_bucket_size}")
    need(c.interval >= 0, "checkpoint.interval", f"must be >= 0, got {c.interval}")
    need(c.keep >= 0, "checkpoint.keep", f"must be >= 0, got {c.keep}")
    need(lg.log_interval >= 1, "logging.log_interval", f"must be >= 1, got {lg.log_interval}")
    need(lg.t_buckets >= 1, "logging.t_buckets", f"must be >= 1, got {lg.t_buckets}")
    need(lg.num_samples >= 0, "logging.num_samples", f"must be >= 0, got {lg.num_samples}")
    need(lg.sample_steps >= 1, "logging.sample_steps", f"must be >= 1, got {lg.sample_steps}")
    need(lg.profile_start is None or lg.profile_start >= 1, "logging.profile_start",
         f"must be a step >= 1 (or null), got {lg.profile_start}")
    need(lg.profile_steps >= 1, "logging.profile_steps", f"must be >= 1, got {lg.profile_steps}")
    for k in FROM_TOKENIZER:
        need(k not in cfg.model, f"model.{k}", "comes from the tokenizer; remove it from the config")
    b = cfg.builtin_data()
    need(isinstance(b["build_default"], bool), "data.build_default", f"expected true/false, got {b['build_default']!r}")
    need(isinstance(b["default_root"], str), "data.default_root", f"expected a folder, got {b['default_root']!r}")
    need(isinstance(b["default_vocab_size"], int) and b["default_vocab_size"] >= 16, "data.default_vocab_size",
         f"expected an integer >= 16, got {b['default_vocab_size']!r}")
    need(b["default_max_bytes"] is None or isinstance(b["default_max_bytes"], int), "data.default_max_bytes",
         f"expected an integer or null, got {b['default_max_bytes']!r}")
    if not b["build_default"]:
        need(bool(cfg.data.get("path")), "data.path", "must name a dataset folder (or set data.build_default: true)")


def from_dict(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    known = set(SECTIONS) | {"model", "data"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {unknown}; known: {sorted(known)}")
    for name in ("model", "data"):
        if not isinstance(raw.get(name) or {}, dict):
            raise ConfigError(f"{name}: expected a mapping, got {raw[name]!r}")
    cfg = RunConfig(model=dict(raw.get("model") or {}), data=dict(raw.get("data") or {}),
                    **{name: _build_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()})
    _check(cfg)
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` -> raw["a"]["b"]["c"] = yaml(value). Sections and fields are checked later."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. optim.lr=3e-4")
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: RunConfig | dict, path: str | Path) -> None:
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
