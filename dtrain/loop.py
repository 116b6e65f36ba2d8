"""The training loop: masked batches in, DeepSpeed steps, evaluation, checkpoints, signals, NaN policy.

NaN/inf policy. A non-finite loss (or gradient norm) must not reach the weights. The loss of a bad
micro-batch is multiplied by NaN, so every gradient of that step is NaN; DeepSpeed's optimizers
(ZeRO 1/2/3 and the pipeline's) compute the global gradient norm across all ranks and stages, find it
non-finite, and discard the step: weights and Adam moments untouched. With the fused AdamW (the default)
the ZeRO-1/2 step decides that on the device and the host learns it a step later (dtrain/zero_step.py);
every rank and stage sees the same verdict (the trainer checks that too). It counts the skip, and stops
after train.max_consecutive_nan bad steps in a row (dtrain/step_flags.py). A step that logs or saves a
checkpoint waits for its own verdict, so logs and checkpoints count exactly. The learning rate follows the
step number, so a skip never shifts the schedule.

Signals. SIGTERM and SIGUSR1 (what Slurm sends before a time limit) only set a flag (dtrain/signals.py); the
ranks agree on it through one small all-reduce per step, read a step later so that the host never waits for
the GPU for it (dtrain/step_flags.py), then save a checkpoint and return "preempted".
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from dtrain import checkpoint as ckpt
from dtrain.config import RunConfig, save_config
from dtrain.engine import Trainee, build, setup_distributed
from dtrain.metrics import Metrics, rank0_print
from dtrain.optim import lr_at, set_lr
from dtrain.pipe_sampling import pipeline_sample
from dtrain.pipeline import nan_unless_finite
from dtrain.profiling import StepProfiler
from dtrain.signals import StopFlag, compile_first
from dtrain.step_flags import StepBook, negation
from model import kernels
from model.diffusion import diffusion_loss_selected, elbo_perplexity, scored_index
from model.flops import expected_masked_fraction, peak_flops, train_flops_per_token
from model.lm import DiffusionLM
from model.sampler import sample


# ------------------------------------------------------------------ data
def prepare_data(cfg: RunConfig):
    """DataConfig + tokenizer. With data.build_default the built-in corpus is built first (rank 0, cached)."""
    from data_pipeline.tokenizer import Tokenizer
    b = cfg.builtin_data()
    path = None
    if b["build_default"]:
        from data_pipeline.corpus import build_default_dataset
        kwargs = {"seq_len": cfg.data.get("seq_len", 1024), "vocab_size": b["default_vocab_size"],
                  "max_bytes": b["default_max_bytes"]}
        if dist.get_rank() == 0:
            rank0_print(f"preparing the built-in dataset under {b['default_root']} (built once, then cached)")
            build_default_dataset(b["default_root"], **kwargs)
        dist.barrier()
        path = build_default_dataset(b["default_root"], progress=False, **kwargs)  # cached: returns the folder
    data_cfg = cfg.data_config(path)
    if not (Path(data_cfg.path) / "manifest.json").exists():
        raise FileNotFoundError(f"data.path: no dataset at {data_cfg.path} (missing manifest.json); build one "
                                f"with `dshards build` or set data.build_default: true")
    return data_cfg, Tokenizer.load(data_cfg.tokenizer_path)


def open_loader(data_cfg, split: str, cfg: RunConfig, trainee: Trainee, mask_id: int):
    from data_pipeline.stream import MaskedBatchLoader
    return MaskedBatchLoader(data_cfg, split=split, dp_rank=trainee.dp_rank, dp_size=trainee.dp_size,
                             micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                             mask_id=mask_id, seed=cfg.run.seed)


def to_device(batch: dict, device: torch.device, mask_id: int) -> dict:
    """The batch on the device (asynchronous from pinned memory), with its scored_index made here on the
    host: selecting the scored positions by a bool mask on the GPU would stall the host every micro-batch
    (model.diffusion.scored_index)."""
    batch = dict(batch, scored_index=scored_index(batch, mask_id))
    if device.type == "cuda":
        batch["scored_index"] = batch["scored_index"].pin_memory()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TimedBatches:
    """Iterator over a loader that records the time spent waiting for batches and moves them to the device."""

    def __init__(self, loader, device, mask_id: int):
        self.loader, self.device, self.mask_id = loader, device, mask_id
        self.it = iter(loader)
        self.wait = 0.0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        try:
            batch = next(self.it)
        except StopIteration:   # a loader that stops after each pass resumes where it is; ours ends for good
            self.it = iter(self.loader)
            try:
                batch = next(self.it)
            except StopIteration:
                raise RuntimeError("data: the stream ended before train.steps (data.epochs reached); raise "
                                   "data.epochs or set it to null") from None
        self.wait += time.perf_counter() - t0
        return to_device(batch, self.device, self.mask_id)


def pipe_batches(batches: Iterator[dict]) -> Iterator[tuple]:
    """(inputs, labels) for PipelineEngine: input_ids to the first stage, the rest to the last."""
    for b in batches:
        yield b["input_ids"], (b["input_ids"], b["targets"], b["t"], b["loss_mask"], b["scored_index"])


# ------------------------------------------------------------------ one step
def train_step(trainee: Trainee, batches: TimedBatches | None, ga: int, poison: bool,
               metrics: Metrics) -> tuple[bool | torch.Tensor, torch.Tensor | float | None]:
    """One optimizer step (ga micro-batches). Returns (skipped, grad_norm) as seen by this rank, neither read
    on the host: `skipped` is a bool tensor on the device where the ZeRO step decides its skip there
    (dtrain/zero_step.py), else DeepSpeed's host answer; it is the same on every rank (the verdict on the
    global gradient norm, or on the pipeline's loss, which every stage receives). A skipped step's
    gradient norm reads inf, and its loss statistics are not counted."""
    engine = trainee.engine
    if trainee.pipeline:
        trainee.loss_fn.poison = poison
        trainee.loss_fn.stats.clear()
        loss = engine.train_batch(pipe_batches(batches) if batches is not None else None)
        stats = list(trainee.loss_fn.stats)
        skipped = torch.logical_not(torch.isfinite(torch.as_tensor(loss)))
    else:
        stats, skipped = [], False
        for _ in range(ga):
            batch = next(batches)
            mask_id, scored = trainee.model_cfg.mask_token_id, batch["scored_index"]
            logits = engine(batch["input_ids"], score_mask=scored)   # the head runs at scored positions only
            loss, s = diffusion_loss_selected(logits, batch, mask_id, scored)
            engine.backward(nan_unless_finite(loss, poison))
            engine.step()
            stats.append(s)
    on_device = getattr(engine.optimizer, "skipped", None)
    skipped = skipped | (on_device if on_device is not None else not engine.was_step_applied())
    for s in stats:
        metrics.add_stats(s, keep=negation(skipped))
    return skipped, engine.get_global_grad_norm()   # a tensor stays on the device: read at the next log


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(trainee: Trainee, data_cfg, cfg: RunConfig) -> dict:
    """ELBO perplexity bound on the validation split: NELBO and token sums all-reduced over all ranks."""
    engine, ga = trainee.engine, cfg.train.grad_accum
    mask_id = trainee.model_cfg.mask_token_id
    sums = torch.zeros(2, dtype=torch.float64)
    batches = None
    if trainee.reads_data:
        # the validation stream wraps around whatever data.epochs says: eval_iters decides how much is read
        val = open_loader(data_cfg.replace(epochs=None), "val", cfg, trainee, mask_id)
        batches = TimedBatches(val, trainee.device, mask_id)
    engine.eval()
    for _ in range(cfg.train.eval_iters):
        if trainee.pipeline:
            trainee.loss_fn.poison = False
            trainee.loss_fn.stats.clear()
            engine.eval_batch(pipe_batches(batches) if batches is not None else None)
            stats = list(trainee.loss_fn.stats)
        else:
            stats = []
            for _ in range(ga):
                batch = next(batches)
                logits = engine(batch["input_ids"], score_mask=batch["scored_index"])
                stats.append(diffusion_loss_selected(logits, batch, mask_id, batch["scored_index"])[1])
        for s in stats:
            sums += torch.tensor([s["nelbo_per_seq"].double().sum().item(), s["tokens_per_seq"].double().sum().item()],
                                 dtype=torch.float64)
    engine.train()
    x = sums.to(trainee.device)
    dist.all_reduce(x)
    nelbo, tokens = x.tolist()
    return {"eval/nelbo_per_token": nelbo / max(tokens, 1.0), "eval/ppl_bound": elbo_perplexity(nelbo, tokens),
            "eval/tokens": tokens}


def text_samples(trainee: Trainee, cfg: RunConfig, tokenizer, step: int, seq_len: int) -> list[str]:
    """A few decoded samples from the current weights. All ranks run it: ZeRO-3 gathers parameters, and
    under pipeline parallelism every stage takes part in each denoising step (dtrain/pipe_sampling.py)."""
    if tokenizer is None or cfg.logging.num_samples == 0:
        return []
    g = torch.Generator(device=trainee.device).manual_seed(cfg.run.seed + step)
    kwargs = {"batch_size": cfg.logging.num_samples, "seq_len": seq_len, "steps": cfg.logging.sample_steps,
              "mask_id": trainee.model_cfg.mask_token_id, "generator": g}
    if trainee.pipeline:
        ids = pipeline_sample(trainee.engine, vocab_size=trainee.model_cfg.vocab_size, device=trainee.device,
                              **kwargs)
    else:
        model = trainee.engine.module
        model.eval()
        ids = sample(model, **kwargs)
        model.train()
    return [tokenizer.decode(row.tolist()) for row in ids.cpu()]


# ------------------------------------------------------------------ the run
def resolved_config(cfg: RunConfig, model_cfg, data_cfg) -> dict:
    """The run config with the model and data written out field by field (loadable with --config; the
    tokenizer-derived vocab_size / mask_token_id are left out)."""
    d = cfg.to_dict()
    d["model"] = {k: v for k, v in model_cfg.to_dict().items() if k not in ("vocab_size", "mask_token_id")}
    builtin = {k: v for k, v in cfg.builtin_data().items() if cfg.builtin_data()["build_default"]}
    d["data"] = {**builtin, **data_cfg.to_dict()}
    return d


class Trainer:
    """One training run: built from a RunConfig, driven by `run()`."""

    def __init__(self, cfg: RunConfig, resume: str | None = None):
        self.cfg = cfg
        self.device = setup_distributed(cfg.parallel.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # which checkpoint to resume from is known before the engine is built: a universal one needs an
        # engine built to load it
        self.resume = resume if resume is not None else cfg.checkpoint.resume
        self.resume_path = ckpt.resolve(self.resume, Path(cfg.checkpoint_dir))
        self.data_cfg, self.tokenizer = prepare_data(cfg)
        self.model_cfg = cfg.model_config(self.tokenizer.vocab_size, self.tokenizer.mask_id)
        universal = self.resume_path is not None and ckpt.is_universal(self.resume_path)
        self.trainee = build(cfg, self.model_cfg, self.device, load_universal=universal)
        self.engine = self.trainee.engine
        self.config_dict = resolved_config(cfg, self.model_cfg, self.data_cfg)
        self.out_dir = Path(cfg.run.out_dir)
        self.seq_len = self.data_cfg.seq_len
        self.flops_per_token = train_flops_per_token(self.model_cfg, self.seq_len,
                                                     head_fraction=expected_masked_fraction(self.data_cfg.eps))
        self.loader = (open_loader(self.data_cfg, "train", cfg, self.trainee, self.tokenizer.mask_id)
                       if self.trainee.reads_data else None)
        layout = {"dp_size": self.trainee.dp_size, "pipeline_stages": self.trainee.num_stages,
                  "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision}
        self.manager = ckpt.CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep, layout=layout,
                                              model=self.model_cfg.to_dict(),
                                              tokenizer_path=self.data_cfg.tokenizer_path,
                                              checksums=cfg.checkpoint.checksums)
        self.state = {"step": 0, "tokens": 0, "skipped_steps": 0}
        self.last_saved: Path | None = None
        if self.rank == 0:
            save_config(self.config_dict, self.out_dir / "config.yaml")
            self._banner()

    def _banner(self) -> None:
        from model.lm import count_parameters
        m, cfg = self.model_cfg, self.cfg
        with torch.device("meta"):
            n_params = count_parameters(DiffusionLM(m))
        rank0_print(f"model {m.family} {m.layer_pattern} d_model={m.d_model} vocab={m.vocab_size} | "
                    f"{n_params / 1e6:.2f}M parameters | {self.flops_per_token:.3g} training FLOPs/token")
        rank0_print(f"world {self.world} = {self.trainee.dp_size} data-parallel x {self.trainee.num_stages} "
                    f"pipeline stages | ZeRO-{cfg.parallel.zero_stage} | {cfg.train.precision} | global batch "
                    f"{cfg.train.micro_batch_size * cfg.train.grad_accum * self.trainee.dp_size} x {self.seq_len}")
        rank0_print(kernels.summary(self.device))

    # ---- checkpoints
    def restore(self) -> None:
        resume, path = self.resume, self.resume_path
        if resume not in (None, "none") and path is None:
            rank0_print(f"--resume {resume}: no complete checkpoint in {self.cfg.checkpoint_dir}; starting fresh")
        if path is None:
            return
        t0 = time.perf_counter()
        saved = self.manager.load(self.engine, path)
        self.state = {k: saved[k] for k in self.state}
        if self.loader is not None:
            self.loader.load_state_dict(saved["loader"])
        ckpt.set_rng_state(saved["rng"])
        self.last_saved = path
        rank0_print(f"resumed from {path} at step {self.state['step']} (loaded in {time.perf_counter() - t0:.1f} s)")

    def save(self) -> Path:
        step = self.state["step"]
        own = {**self.state, "loader": self.loader.state_dict() if self.loader is not None else None,
               "rng": ckpt.rng_state()}
        crash = self.cfg.debug.crash_in_checkpoint_at_step == step
        t0 = time.perf_counter()
        self.last_saved = self.manager.save(self.engine, step, own, self.config_dict, crash_mid_write=crash)
        rank0_print(f"checkpoint {self.last_saved} saved in {time.perf_counter() - t0:.1f} s")
        return self.last_saved

    # ---- the loop
    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.restore()
        batches = (TimedBatches(self.loader, self.device, self.trainee.model_cfg.mask_token_id)
                   if self.loader is not None else None)
        tokens_per_step = t.micro_batch_size * t.grad_accum * self.trainee.dp_size * self.seq_len
        peak = cfg.logging.peak_flops_per_gpu or (
            peak_flops(torch.cuda.get_device_name()) if self.device.type == "cuda" else None)
        metrics = Metrics(out_dir=str(self.out_dir), enabled_tb=cfg.logging.tensorboard,
                          t_buckets=cfg.logging.t_buckets, tokens_per_step=tokens_per_step,
                          flops_per_token=self.flops_per_token, peak_flops_total=peak * self.world if peak else None,
                          total_steps=t.steps, device=self.device)
        metrics.start_step = self.state["step"]
        compile_first(self.device, rank0_print)   # LLVM's signal actions first, the trainer's on top
        stop = StopFlag(report=rank0_print)
        stop.install()
        profiler = StepProfiler(cfg.logging.profile_start, cfg.logging.profile_steps, self.out_dir,
                                dist.get_rank(), self.device)
        book, status = StepBook(self.device, self.state, t.max_consecutive_nan), "finished"
        try:
            while self.state["step"] < t.steps:
                step = self.state["step"] + 1   # the step being taken, counted from 1 as in logs and checkpoints
                stop.reinstall(step - 1)   # after the last step's evaluation, samples, checkpoint (dtrain/signals.py)
                set_lr(self.engine.optimizer, lr_at(step - 1, cfg.optim, t.steps))
                wait0 = batches.wait if batches is not None else 0.0
                profiler.before(step)
                first_step = step == metrics.start_step + 1
                if first_step:   # on a fresh GPU node it runs minutes without a line: say why
                    rank0_print(f"step {step}: the first step runs now" + (
                        f"; it compiles the Triton and torch.compile kernels"
                        f"{' and captures the CUDA graphs' if t.cuda_graphs else ''} (minutes on a fresh node, "
                        f"seconds from a warm kernel cache)" if self.device.type == "cuda" else ""))
                    first_t0 = time.perf_counter()
                skipped, norm = train_step(self.trainee, batches, t.grad_accum, step in cfg.debug.nan_at_steps,
                                           metrics)
                if first_step:
                    rank0_print(f"step {step}: the first step took {time.perf_counter() - first_t0:.1f} s")
                stop.reinstall(step)   # and after the step itself, where the first step's libraries replaced it
                trace = profiler.after(step)
                if trace is not None:
                    rank0_print(f"profile of steps {cfg.logging.profile_start}-{step}: {trace.parent}/rank*")
                self.state["step"] = step
                self.state["tokens"] += tokens_per_step
                metrics.add_step(grad_norm=norm, data_wait=(batches.wait - wait0) if batches is not None else 0.0)
                # the flags go out in one small all-reduce, read a step late: the host does not wait here
                stopping = book.send(step, skipped, stop.signal_name is not None)
                logging = step % cfg.logging.log_interval == 0 or step == t.steps
                evaluating = bool(t.eval_interval) and (step % t.eval_interval == 0 or step == t.steps)
                saving = bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0
                if logging or evaluating or saving or stopping:   # this step's verdict first: the counts are exact
                    stopping = book.settle(step) or stopping
                if logging:
                    metrics.log(step, lr=lr_at(step - 1, cfg.optim, t.steps),
                                total_skipped=self.state["skipped_steps"])
                book.stop_if_too_many(self.last_saved)
                if evaluating:
                    self.evaluate(metrics)
                if stopping:
                    self.save()
                    name = stop.signal_name or "a stop signal (sent to another rank)"
                    rank0_print(f"PREEMPTED: received {name}; checkpoint {self.last_saved} saved at step {step}; "
                                f"exiting cleanly — rerun with --resume auto to continue")
                    status = "preempted"
                    break
                if saving:
                    self.save()
            final = ckpt.tag_for(self.state["step"])
            if status == "finished" and cfg.checkpoint.save_final and \
                    (self.last_saved is None or Path(self.last_saved).name != final):
                self.save()
        finally:
            profiler.close()
            metrics.close()
        if status == "finished":
            rank0_print(f"done: {self.state['step']} steps, {self.state['tokens']} tokens, "
                        f"{self.state['skipped_steps']} skipped; tensorboard --logdir {self.out_dir / 'tensorboard'}")
        return {"status": status, **self.state, "checkpoint": str(self.last_saved) if self.last_saved else None}

    def evaluate(self, metrics: Metrics) -> dict:
        step = self.state["step"]
        result = evaluate(self.trainee, self.data_cfg, self.cfg)
        metrics.write(step, result)
        rank0_print(f"eval step {step} | nelbo/token {result['eval/nelbo_per_token']:.4f} | "
                    f"ppl <= {result['eval/ppl_bound']:.2f}")
        texts = text_samples(self.trainee, self.cfg, self.tokenizer, step, self.seq_len)
        if texts:
            metrics.text(step, "samples", texts)
        return result


def train(cfg: RunConfig, resume: str | None = None) -> dict:
    return Trainer(cfg, resume).run()


def evaluate_checkpoint(path: str, overrides: list[str] | None = None) -> dict:
    """`dtrain eval`: the ELBO perplexity bound of a checkpoint on the validation split.

    The run config stored in the checkpoint is used (overrides apply on top, e.g. train.eval_iters=50);
    launch with the same number of pipeline stages the checkpoint was written with.
    """
    from dtrain.config import apply_overrides, from_dict
    path = ckpt.resolve(path, Path(path))
    cfg = from_dict(apply_overrides(ckpt.read_trainer_config(path), overrides or []))
    device = setup_distributed(cfg.parallel.backend)
    data_cfg, tokenizer = prepare_data(cfg)
    universal = ckpt.is_universal(path)
    trainee = build(cfg, cfg.model_config(tokenizer.vocab_size, tokenizer.mask_id), device, load_universal=universal)
    # a universal checkpoint restores the weights through the optimizer's state (DeepSpeed's zero/ folders)
    load_path, _ = trainee.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=universal,
                                                  load_lr_scheduler_states=False, load_module_only=not universal)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    result = evaluate(trainee, data_cfg, cfg)
    result["checkpoint"] = str(path)
    return result
