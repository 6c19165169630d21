"""The training loop: one ``fit(config, run_dir)`` for every method.

Reads top to bottom: build data, network, optimiser and objective; resume from
the run folder's checkpoint if there is one; then per epoch train, evaluate, let
the objective update its state, append a line to ``metrics.jsonl`` and write an
atomic checkpoint. Randomness (shuffling, augmentation, objective draws) comes
from a generator reseeded from (seed, epoch) at every epoch start, so a run killed
anywhere resumes from its last checkpoint and ends with the same weights as an
uninterrupted run.

On CUDA the step runs under bf16 autocast with channels_last and float32 master
weights, and metrics accumulate on the device: the host synchronises once per
epoch (and every ``SYNC_EVERY`` steps to check for a non-finite loss).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import DeviceData, load_dataset
from .models import build_model
from .objectives import EpochEnd, make_objective

CHECKPOINT = "checkpoint.pt"
SYNC_EVERY = 100  # steps between host checks for a non-finite loss


class NonFiniteLossError(FloatingPointError):
    pass


def resolve_device(device=None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimisation step ``step`` (0-based): linear warm-up, then multistep or cosine."""
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * config.lr * (1 + math.cos(math.pi * progress))
    epoch = step // steps_per_epoch
    return config.lr * config.gamma ** sum(epoch >= m for m in config.milestone_epochs())


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_counts(counts: torch.Tensor, index: torch.Tensor) -> None:
    """counts[index] += 1 with repeats; unlike torch.bincount it never synchronises with the host on CUDA."""
    counts.index_add_(0, index, torch.ones_like(index))


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


class Trainer:
    """State of one training run; objectives reach the model, data and generator through it."""

    def __init__(self, config: TrainConfig, device=None, data_root=None, data: DeviceData | None = None):
        self.config = config
        self.device = resolve_device(device)
        self.data = data or DeviceData(load_dataset(config.dataset, data_root), self.device, config.rotation)
        torch.manual_seed(config.seed)
        model = build_model(config.arch, self.data.num_classes, config.width).to(self.device)
        self.cuda = self.device.type == "cuda"
        self.model = model.to(memory_format=torch.channels_last) if self.cuda else model
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay, **({"fused": True} if self.cuda else {}))
        self.generator = torch.Generator(self.device)
        self.objective = make_objective(config.objective, config.objective_args)
        self.objective.setup(self)
        self.steps_per_epoch = math.ceil(self.data.num_train / config.batch_size)
        self.epoch = 0
        C = self.data.num_classes
        # Per-epoch confusion counts, kept on the host for checkpoints (300 epochs x 100 x 100 int32 = 12 MB).
        self.train_confusions = torch.zeros(config.epochs, C, C, dtype=torch.int32)
        self.test_confusions = torch.zeros(config.epochs, C, C, dtype=torch.int32)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "train_confusions": self.train_confusions,
            "test_confusions": self.test_confusions,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.train_confusions.copy_(state["train_confusions"])
        self.test_confusions.copy_(state["test_confusions"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, progress: bool) -> dict:
        config, C = self.config, self.data.num_classes
        self.model.train()
        self.generator.manual_seed(epoch_seed(config.seed, self.epoch))
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        confusion = torch.zeros(C * C, device=self.device, dtype=torch.long)
        first_bad_step = torch.full((), -1, device=self.device, dtype=torch.long)
        batches = self.data.train_batches(config.batch_size, self.generator)
        for i, batch in enumerate(_progress(batches, progress, total=self.steps_per_epoch, leave=False,
                                            desc=f"epoch {self.epoch + 1}/{config.epochs}")):
            step = self.epoch * self.steps_per_epoch + i
            lr = learning_rate(config, step, self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.cuda:
                batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                loss, logits = self.objective.loss(self.model, batch, self.epoch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss = loss.detach()
            bad = ~torch.isfinite(loss) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, i), first_bad_step)
            loss_sum += loss.float() * len(batch.labels)
            predictions = logits.detach().argmax(1)
            correct += (predictions == batch.labels).sum()
            add_counts(confusion, batch.labels * C + predictions)
            if (i + 1) % SYNC_EVERY == 0:
                self._check_finite(first_bad_step)
        self._check_finite(first_bad_step)
        self.last_train_confusion = confusion.view(C, C)
        n = self.data.num_train
        return {"train_loss": loss_sum.item() / n, "train_top1": 100 * correct.item() / n, "lr": lr}

    def _check_finite(self, first_bad_step: torch.Tensor) -> None:
        bad = int(first_bad_step.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at epoch {self.epoch + 1} (1-based), step {bad} of that epoch "
                f"(objective {self.config.objective!r}, lr schedule peak {self.config.lr}). The run stopped; its "
                f"last checkpoint (end of epoch {self.epoch}) is kept. Lower the learning rate or check the "
                f"objective's inputs, then train again under a new config.")

    @torch.no_grad()
    def evaluate(self, return_logits: bool = False) -> dict:
        """Loss, top-1, top-5 and confusion counts on the test split (eval mode, no augmentation)."""
        self.model.eval()
        C = self.data.num_classes
        loss_sum = torch.zeros((), device=self.device)
        top1 = torch.zeros((), device=self.device, dtype=torch.long)
        top5 = torch.zeros((), device=self.device, dtype=torch.long)
        confusion = torch.zeros(C * C, device=self.device, dtype=torch.long)
        all_logits = []
        for images, labels in self.data.test_batches():
            if self.cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = self.model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            topk = logits.topk(min(5, C), dim=1).indices
            top1 += (topk[:, 0] == labels).sum()
            top5 += (topk == labels[:, None]).any(1).sum()
            add_counts(confusion, labels * C + topk[:, 0])
            if return_logits:
                all_logits.append(logits)
        n = len(self.data.test_labels)
        result = {"test_loss": loss_sum.item() / n, "test_top1": 100 * top1.item() / n,
                  "test_top5": 100 * top5.item() / n, "confusion": confusion.view(C, C)}
        if return_logits:
            result["logits"] = torch.cat(all_logits)
        return result


def fit(config: TrainConfig, run_dir: str | Path, device=None, data_root=None, progress: bool = True,
        data: DeviceData | None = None) -> dict:
    """Train ``config`` in ``run_dir`` (resuming from its checkpoint) and write the final artefacts.

    Returns the summary that is also written to ``run_dir/summary.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, device, data_root, data)
    checkpoint = run_dir / CHECKPOINT
    metrics_path = run_dir / "metrics.jsonl"
    if checkpoint.is_file():
        trainer.load_state_dict(load_checkpoint(checkpoint, config))
    # Drop metric lines of epochs after the checkpoint (written before a crash): they are redone.
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    history = history[:trainer.epoch]
    atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    start = time.perf_counter()
    for _ in _progress(range(trainer.epoch, config.epochs), progress, initial=trainer.epoch,
                       total=config.epochs, desc=config.run_id()):
        epoch_start = time.perf_counter()
        record = {"epoch": trainer.epoch + 1, **trainer.train_epoch(progress)}
        result = trainer.evaluate()
        trainer.train_confusions[trainer.epoch] = trainer.last_train_confusion.cpu().int()
        trainer.test_confusions[trainer.epoch] = result["confusion"].cpu().int()
        trainer.objective.end_epoch(EpochEnd(trainer.epoch, trainer.last_train_confusion, result["confusion"]))
        record.update({k: result[k] for k in ("test_loss", "test_top1", "test_top5")})
        record["seconds"] = time.perf_counter() - epoch_start
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        history.append(record)
        trainer.epoch += 1
        atomic_save(trainer.state_dict(), checkpoint)

    final = trainer.evaluate(return_logits=True)
    np.save(run_dir / "test_logits.npy", final["logits"].cpu().numpy())
    np.savez_compressed(run_dir / "confusions.npz", train=trainer.train_confusions.numpy(),
                        test=trainer.test_confusions.numpy())
    atomic_save(trainer.model.state_dict(), run_dir / "model.pt")
    best = max(history, key=lambda h: h["test_top1"])
    summary = {
        "run_id": config.run_id(), "num_classes": trainer.data.num_classes, "final_top1": final["test_top1"], "final_top5": final["test_top5"],
        "best_top1": best["test_top1"], "best_top5": best["test_top5"], "best_epoch": best["epoch"],
        "train_seconds": sum(h["seconds"] for h in history), "device": str(trainer.device),
        "torch": torch.__version__, "seconds_this_session": time.perf_counter() - start,
    }
    # summary.json is written last and atomically: its presence marks a finished run.
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    checkpoint.unlink()
    return summary


def load_checkpoint(path: Path, config: TrainConfig | None = None) -> dict:
    """Load a checkpoint safely (tensors and plain values only) and check it belongs to ``config``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an arbitrary Python object
        raise RuntimeError(
            f"cannot load checkpoint {path}: it holds Python objects other than tensors and plain values, "
            f"and loading it could run arbitrary code, so it was refused ({str(err).splitlines()[-1][:200]}). "
            f"cdlib never writes such files: delete it (the run restarts from scratch) unless you trust its "
            f"source.") from err
    except Exception as err:  # truncated or corrupted archive
        raise RuntimeError(
            f"cannot load checkpoint {path}: {type(err).__name__}: {str(err)[:300]}. If the file is truncated, "
            f"delete it to restart that run from scratch (other runs are unaffected); never load checkpoints "
            f"from untrusted sources.") from err
    if config is not None and state.get("config") != config.to_dict():
        raise RuntimeError(
            f"checkpoint {path} was written for another config ({state.get('config')}), not {config.to_dict()}. "
            f"Move it away or delete it; it will not be resumed.")
    return state


def main(argv=None) -> None:
    """``python -m cdlib.train CONFIG.json RUN_DIR``: train one run (used by workers and tests)."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    fit(config, args.run_dir, args.device, args.data_root, progress=not args.quiet)


if __name__ == "__main__":
    main()
