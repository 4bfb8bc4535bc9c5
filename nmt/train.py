"""train(cfg): read the data, build the model, and run the loop: clip, schedule, validate, checkpoint, stop."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nmt.checkpoint import load_latest, save_checkpoint
from nmt.config import DecodeConfig, TrainConfig
from nmt.console import setup_logging
from nmt.data.batching import Batch, collate, epoch_batches, padding_share
from nmt.data.pipeline import TrainingData, prepare_training_data
from nmt.data.vocab import PAD_ID, SPECIAL_IDS
from nmt.decoding import translate_sentences
from nmt.errors import Interrupted, NMTError
from nmt.model.drift import EmbeddingDrift
from nmt.model.seq2seq import Seq2Seq, build_model
from nmt.model.vectors import load_pretrained_, training_words
from nmt.optim import build_adam, clip_grad_norm, unfreeze_embeddings
from nmt.plots import plot_embedding_drift, plot_training_curves
from nmt.run import RunFiles, check_resumable, write_config
from nmt.runtime import pick_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything about progress that a resumed run must restore."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    elapsed: float = 0.0  # training seconds, summed over resumes (for trainer.max_time)
    best_metric: float | None = None
    bad_validations: int = 0  # validations since the best one (early stopping)
    skipped_steps: int = 0  # updates skipped for a NaN or infinite loss or gradient
    skipped_in_row: int = 0
    stop_reason: str = ""


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("outputs") / cfg.name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


# --- model and optimiser -----------------------------------------------------------------------------

def setup_embeddings(model: Seq2Seq, cfg: TrainConfig, data: TrainingData) -> None:
    """Load pretrained vectors (logging coverage) and freeze the chosen sides."""
    emb = cfg.model.embeddings
    for side, path in (("src", emb.src_vectors), ("tgt", emb.tgt_vectors)):
        if path is None or (side == "tgt" and cfg.model.tie_src_tgt and path == emb.src_vectors):
            continue  # (tied: the one shared matrix is loaded already)
        module = model.src_embed if side == "src" else model.tgt_embed
        pieces = [data.vocab.side(side).id_to_piece(i) for i in range(data.vocab.size(side))]
        words = None
        if emb.vectors_subword_mean:
            words = training_words(getattr(data.train, f"{side}_flat"), getattr(data.train, f"{side}_offsets"),
                                   pieces, SPECIAL_IDS)
        coverage = load_pretrained_(module.weight, pieces, Path(path), SPECIAL_IDS, data.token_counts(side),
                                    fmt=emb.vectors_format, lowercase=emb.vectors_lowercase, words=words)
        log.info("coverage: %s", coverage.line(side, Path(path)))
    if emb.freeze in ("src", "both"):
        model.src_embed.weight.requires_grad_(False)
    if emb.freeze in ("tgt", "both"):
        model.tgt_embed.weight.requires_grad_(False)


def build_optimizer(model: Seq2Seq, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Frozen parameters are left out, so they have no optimizer state and no weight decay.
    return build_adam(model, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.weight_decay, cfg.model.embeddings.sparse)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    optim = cfg.optim
    if optim.scheduler == "plateau":
        mode = "max" if cfg.trainer.early_stopping_metric == "bleu" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=optim.factor,
                                                          patience=optim.patience, min_lr=optim.min_lr)
    if optim.scheduler == "inverse_sqrt":
        warmup = optim.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1))))
    return None


# --- one step and validation -----------------------------------------------------------------------

def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over real target positions: logits (B, T, V), targets (B, T) -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing, reduction="sum")


def train_step(model: Seq2Seq, batch: Batch, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig) -> tuple[float, int, bool]:
    """Forward, backward, clip and update on one batch -> (mean loss per token, target tokens, updated).

    A NaN or infinite loss or gradient skips the update (updated = False) rather than poisoning the weights.
    """
    num_tokens = batch.num_tgt_tokens
    logits = model(batch.src_ids, batch.src_lens, batch.tgt_in)  # (B, T, V)
    loss = sequence_loss(logits, batch.tgt_out, cfg.optim.label_smoothing) / num_tokens
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], max_norm)
    value = loss.item()
    if not (math.isfinite(value) and math.isfinite(float(grad_norm))):
        optimizer.zero_grad(set_to_none=True)
        return value, num_tokens, False
    optimizer.step()
    return value, num_tokens, True


@torch.no_grad()
def validate(model: Seq2Seq, data: TrainingData, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Dev loss and perplexity under teacher forcing, and dev BLEU of the decoded dev set."""
    model.eval()
    corpus, total_loss, total_tokens = data.val_encoded, 0.0, 0
    usable = [i for i in range(len(corpus)) if len(corpus.src(i)) and len(corpus.tgt(i))]
    for start in tqdm(range(0, len(usable), 64), desc="validate", unit="batch", leave=False):
        batch = collate(corpus, usable[start:start + 64]).to(device)
        total_loss += float(sequence_loss(model(batch.src_ids, batch.src_lens, batch.tgt_in), batch.tgt_out))
        total_tokens += batch.num_tgt_tokens
    decode_cfg = DecodeConfig(beam_size=cfg.trainer.val_beam_size, alpha=0.0 if cfg.trainer.val_beam_size == 1 else 1.0,
                              max_len_ratio=cfg.trainer.val_max_len_ratio, batch_size=64)
    translations = translate_sentences(model, data.vocab, data.val.src, decode_cfg, device, progress=True)
    hypotheses = [t.text for t in translations]
    bleu = sacrebleu.corpus_bleu(hypotheses, [data.val.tgt]).score
    model.train()
    loss = total_loss / max(1, total_tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bleu": bleu, "example": hypotheses[0]}


# --- checkpoints --------------------------------------------------------------------------------------

def checkpoint_state(model, optimizer, scheduler, state: TrainState, cfg_dict: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "train_state": asdict(state),
        "config": cfg_dict,
    }


def restore(checkpoint: dict, model, optimizer, scheduler) -> TrainState:
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint["scheduler"]:
        scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return TrainState(**checkpoint["train_state"])


# --- the loop -----------------------------------------------------------------------------------------

class Trainer:
    """Holds what the loop needs; `run` reads top to bottom."""

    def __init__(self, cfg: TrainConfig, cfg_dict: dict, files: RunFiles):
        self.cfg, self.cfg_dict, self.files = cfg, cfg_dict, files
        self.device = pick_device(cfg.trainer.device)
        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
        self.data = prepare_training_data(cfg.data, Path(cfg.paths.data_dir), files.run_dir, cfg.trainer.seed)
        self.model = build_model(cfg.model, self.data.vocab.size("src"), self.data.vocab.size("tgt"))
        setup_embeddings(self.model, cfg, self.data)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.state = TrainState()
        self.drift = EmbeddingDrift(files.checkpoint("step0"),
                                    {side: self.data.token_counts(side) for side in ("src", "tgt")})
        self.epoch_size = 0  # batches in the current epoch
        self.interrupted = 0  # the signal that asked us to stop, if any
        params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %s parameters, device %s", f"{params:,}", self.device)

    def save(self, name: str) -> None:
        state = checkpoint_state(self.model, self.optimizer, self.scheduler, self.state, self.cfg_dict)
        save_checkpoint(state, self.files.checkpoint(name), keep_previous=name == "last")

    def resume(self) -> None:
        checkpoint, path = load_latest(self.files.checkpoint("last"), map_location=self.device)
        self.unfreeze_if_due(checkpoint["train_state"]["step"])  # so the optimizer has the groups it saved
        self.state = restore(checkpoint, self.model, self.optimizer, self.scheduler)
        self.state.stop_reason = ""  # limits are checked again against the (possibly new) settings
        drop_metrics_after(self.files.metrics, self.state.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                 self.state.epoch + 1, self.state.batch_in_epoch)

    def log_metrics(self, record: dict) -> None:
        with open(self.files.metrics, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def on_signal(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop at once; the last checkpoint on disk still stands
            raise KeyboardInterrupt
        self.interrupted = signum
        log.warning("%s: stopping after this step and saving checkpoints/last.pt "
                    "(press Ctrl-C again to quit at once)", signal.Signals(signum).name)

    def run(self, resuming: bool) -> TrainState:
        handlers = {signum: signal.signal(signum, self.on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run(resuming)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _run(self, resuming: bool) -> TrainState:
        cfg = self.cfg.trainer
        if resuming:
            self.resume()
        else:
            self.save("step0")  # the initial weights, to compare embeddings before and after
        max_seconds = cfg.max_seconds
        started = time.monotonic() - self.state.elapsed
        while self.state.epoch < cfg.max_epochs and not self.state.stop_reason:
            self.train_epoch(started, max_seconds)
        self.state.stop_reason = self.state.stop_reason or f"trainer.max_epochs={cfg.max_epochs} reached"
        if self.interrupted:
            self.save("last")
            raise Interrupted(
                f"Training stopped by {signal.Signals(self.interrupted).name} at step {self.state.step}; "
                f"{self.files.checkpoint('last')} is saved. Resume with: {resume_command(self.files.run_dir)}"
            )
        best = "none" if self.state.best_metric is None else f"{self.state.best_metric:.4g}"
        log.info("training stopped: %s; best dev %s %s; run directory %s", self.state.stop_reason,
                 cfg.early_stopping_metric, best, self.files.run_dir)
        return self.state

    def train_epoch(self, started: float, max_seconds: float | None) -> None:
        cfg, state = self.cfg.trainer, self.state
        batches = epoch_batches(self.data.train, self.cfg.data.batch_tokens, self.cfg.data.sort_pool, cfg.seed, state.epoch)
        self.epoch_size = len(batches)
        if state.batch_in_epoch == 0:
            log.info("epoch %d: %d batches, %.1f%% padding", state.epoch + 1, len(batches),
                     100 * padding_share(self.data.train, batches))
        bar = tqdm(total=len(batches), initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}", unit="batch",
                   dynamic_ncols=True)
        window_tokens, window_start, loss_sum, loss_count = 0, time.monotonic(), 0.0, 0
        self.model.train()
        end_of_epoch = False
        while not end_of_epoch and not state.stop_reason:
            batch = collate(self.data.train, batches[state.batch_in_epoch]).to(self.device)
            loss, tokens, updated = train_step(self.model, batch, self.optimizer, self.cfg)
            self.count_nonfinite(updated, loss)
            if self.cfg.optim.scheduler == "inverse_sqrt":
                self.scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            state.elapsed = time.monotonic() - started
            self.unfreeze_if_due(state.step)
            window_tokens += tokens
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            speed = window_tokens / max(1e-9, time.monotonic() - window_start)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}", lr=f"{self.lr:.2e}", refresh=False)
            bar.update(1)
            if state.step % cfg.log_every == 0:
                self.log_metrics({"kind": "train", "step": state.step, "epoch": state.epoch + 1,
                                  "loss": loss_sum / loss_count, "lr": self.lr, "tgt_tokens_per_s": speed,
                                  "elapsed": state.elapsed})
                loss_sum, loss_count = 0.0, 0
            state.stop_reason = self.limit_reached(max_seconds)
            end_of_epoch = state.batch_in_epoch == len(batches)
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if self.interrupted:
                state.stop_reason = "interrupted"
                break  # run() saves last.pt; validating now would keep the user waiting
            due = state.step % cfg.validate_every == 0 if cfg.validate_every else end_of_epoch
            if due or state.stop_reason or state.epoch >= cfg.max_epochs:
                self.validate_and_checkpoint()
        bar.close()

    def count_nonfinite(self, updated: bool, loss: float) -> None:
        state, limit = self.state, self.cfg.trainer.max_nonfinite_steps
        if updated:
            state.skipped_in_row = 0
            return
        state.skipped_steps += 1
        state.skipped_in_row += 1
        log.warning("step %d: loss or gradient is not finite (loss %s); update skipped (%d in a row, %d in all)",
                    state.step + 1, loss, state.skipped_in_row, state.skipped_steps)
        if state.skipped_in_row >= limit:
            raise NMTError(
                f"Training stopped: {limit} updates in a row had a NaN or infinite loss or gradient "
                f"(trainer.max_nonfinite_steps={limit}). The checkpoints in {self.files.run_dir / 'checkpoints'} "
                f"are untouched. Try a lower learning rate (optim.lr={self.cfg.optim.lr:g} now) or a smaller "
                f"optim.clip_grad_norm, then resume with trainer.resume=true or start a new run."
            )

    def unfreeze_if_due(self, step: int) -> None:
        """model.embeddings.unfreeze_after=N: the frozen embeddings join the optimizer after update N."""
        after = self.cfg.model.embeddings.unfreeze_after
        if after and step >= after and unfreeze_embeddings(self.model, self.optimizer, self.scheduler):
            log.info("step %d: embeddings unfrozen (model.embeddings.unfreeze_after=%d)", step, after)

    def limit_reached(self, max_seconds: float | None) -> str:
        cfg, state = self.cfg.trainer, self.state
        if cfg.max_steps and state.step >= cfg.max_steps:
            return f"trainer.max_steps={cfg.max_steps} reached"
        if max_seconds is not None and state.elapsed >= max_seconds:
            return f"trainer.max_time={cfg.max_time} reached"
        return ""

    def validate_and_checkpoint(self) -> None:
        cfg, state = self.cfg.trainer, self.state
        metrics = validate(self.model, self.data, self.cfg, self.device)
        value = metrics[cfg.early_stopping_metric]
        sign = 1.0 if cfg.early_stopping_metric == "bleu" else -1.0
        improved = state.best_metric is None or sign * (value - state.best_metric) > cfg.min_delta
        if improved:
            state.best_metric, state.bad_validations = value, 0
        else:
            state.bad_validations += 1
            if cfg.patience and state.bad_validations >= cfg.patience and not state.stop_reason:
                state.stop_reason = f"no dev {cfg.early_stopping_metric} improvement in {cfg.patience} validations"
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value)
        epoch = state.epoch if state.batch_in_epoch == 0 else state.epoch + state.batch_in_epoch / self.epoch_size
        log.info("step %d, epoch %.2f: dev loss %.3f, ppl %.2f, BLEU %.2f, lr %.2e%s | %s", state.step, epoch,
                 metrics["loss"], metrics["ppl"], metrics["bleu"], self.lr, " (best)" if improved else "",
                 metrics["example"][:80])
        self.log_metrics({"kind": "val", "step": state.step, "epoch": round(epoch, 4), "lr": self.lr,
                          "elapsed": state.elapsed, **{k: v for k, v in metrics.items() if k != "example"}})
        self.log_metrics(self.drift.measure(self.model, state.step))
        plot_embedding_drift(self.files.metrics, self.files.run_dir / "embedding_drift.png")
        if improved:
            self.save("best")
        self.save("last")  # last: written after best, so a resume never lacks a best checkpoint
        plot_training_curves(self.files.metrics, self.files.run_dir / "training_curves.png")


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics logged after the checkpoint we resume from: those steps run again."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the same overrides, the run directory, resume=true."""
    keep = [a for a in sys.argv[1:] if not a.startswith(("paths.run_dir=", "trainer.resume="))]
    return shlex.join(["nmt-train", *keep, f"paths.run_dir={run_dir}", "trainer.resume=true"])


def train(cfg: TrainConfig, cfg_dict: dict) -> Path:
    """Train as configured; returns the run directory."""
    run_dir = Path(cfg.paths.run_dir) if cfg.paths.run_dir else default_run_dir(cfg)
    files = RunFiles(run_dir)
    resuming = check_resumable(files, cfg.trainer.resume, cfg_dict)
    setup_logging(files.log)
    cfg_dict["paths"]["run_dir"] = str(run_dir)
    # absolute, so nmt-evaluate finds the data from any working directory (data_dir=... overrides it)
    cfg_dict["paths"]["data_dir"] = str(Path(cfg.paths.data_dir).resolve())
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    trainer = Trainer(cfg, cfg_dict, files)
    write_config(files, cfg_dict)  # only once the data is ready, so a failed start leaves no "run" behind
    trainer.run(resuming)
    return run_dir
