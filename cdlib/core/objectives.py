"""Training objectives: what the engine minimises, as functions of logits.

An objective turns the logits of one augmented batch into a scalar loss. The engine
(``cdlib.core.train.fit``) runs every forward pass: the student's, and the extra ones an
objective declares in ``extra_forwards``:

    "teacher"  the KD teacher's logits of the same images -> ``batch.teacher_logits``
    "partner"  the student's gradient-free train-mode logits of the images of
               ``partners(labels, generator)`` (CS-KD)      -> ``batch.partner_logits``

An objective may own state (PS-KD's table of past predictions, Confusion
Distillation's EMA matrix), which goes into every checkpoint through
``state_dict``/``load_state_dict``, and it is told when an epoch ends. The loop is the
same for every method, so in a table two methods differ only in the objective. No
objective loads networks or knows the run store: KD's ``teacher`` argument names a
run, and the layer that knows runs hands the engine that network.

Registered objectives (``TrainConfig.objective`` -> class):

    ce        CrossEntropy            plain cross-entropy
    ls        LabelSmoothing          label smoothing, PyTorch's variant
    kd        KnowledgeDistillation   Hinton KD from a stored teacher run (also Tf-KD_self)
    tfkd_reg  TfKDReg                 Tf-KD_reg, teacher-free KD to a hand-made target
    cskd      CSKD                    class-wise self-KD (Yun et al. 2020)
    pskd      PSKD                    progressive self-KD (Kim et al. 2021)
    cd        ConfusionDistillation   the paper's method and its ablations

Definitions follow each method's paper and official code (CS-KD: alinlab/cs-kd; PS-KD:
lgcnsai/PS-KD-Pytorch; Tf-KD: yuanli2333/Teacher-free-Knowledge-Distillation) and, for CD,
the paper's Sections 4.2 and 4.4.

The networks' heads compute in float32 (``cdlib.core.models``), and every loss here is
computed from ``logits.float()``, so losses are float32 under bf16 autocast too.
``loss`` is called exactly once per optimiser step (PS-KD writes its table in it);
the engine gathers the training confusion counts from the same logits.

To add a method: subclass :class:`Objective`, implement ``loss`` (and the hooks it
needs), and register it in ``OBJECTIVES`` under the name used in
``TrainConfig.objective``; its keyword arguments come from
``TrainConfig.objective_args`` (JSON, so plain numbers, strings and lists).
"""
from __future__ import annotations

import inspect
import itertools
import numbers
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from cdlib.core.losses import Objective, cross_entropy, in_range, smoothing_matrix, soft_loss
from cdlib.errors import ConfigError


# ---------------------------------------------------------------- baselines

class CrossEntropy(Objective):
    name = "ce"

    def loss(self, logits, batch, epoch):
        return cross_entropy(logits, batch.labels)


class LabelSmoothing(Objective):
    """Cross-entropy to ``(1 - eps) * onehot + eps / K`` (PyTorch's ``label_smoothing``).

    The other common variant puts ``eps / (K - 1)`` on the wrong classes; for
    K = 100 the difference is negligible; we use PyTorch's.
    """

    name = "ls"

    def __init__(self, eps: float = 0.1):
        self.eps = in_range(self.name, "eps", eps, 0, 1, high_open=True)

    def loss(self, logits, batch, epoch):
        return F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.eps)


# ---------------------------------------------------------------- teacher-based

class KnowledgeDistillation(Objective):
    """Hinton KD: ``w_ce * CE + w_kd * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    ``teacher`` names a run in the run store; the engine runs that network (frozen, in
    eval mode, without gradient) on the same augmented batch as the student and
    passes its logits as ``batch.teacher_logits``. Defaults are the paper's preset (its Section 3): T = 2,
    w_kd = 0.85, w_ce = 0.15 (KD benchmarks use 0.9 / 0.1 / T = 4). Tf-KD_self is
    this objective with a teacher of the student's own architecture.
    """

    name = "kd"
    extra_forwards = ("teacher",)

    def __init__(self, teacher: str, T: float = 2.0, w_kd: float = 0.85, w_ce: float = 0.15):
        if not isinstance(teacher, str) or not teacher:
            raise ConfigError(f"objective 'kd': teacher must name a run (its run id or folder), got {teacher!r}")
        self.teacher = teacher
        self.T = in_range(self.name, "T", T, 0, low_open=True)
        self.w_kd, self.w_ce = in_range(self.name, "w_kd", w_kd, 0), in_range(self.name, "w_ce", w_ce, 0)

    def loss(self, logits, batch, epoch):
        target = F.softmax(batch.teacher_logits.detach().float() / self.T, dim=1)
        return self.w_ce * cross_entropy(logits, batch.labels) + self.w_kd * soft_loss(target, logits, self.T)


class TfKDReg(Objective):
    """Tf-KD_reg (Yuan et al. 2020): ``(1 - a) * CE + a * KL(softmax(p_d / T) || softmax(z))``.

    p_d is ``correct_prob`` (0.99) on the true class and ``(1 - correct_prob) / (K - 1)``
    elsewhere, pushed through a softmax with temperature T as if it were logits,
    which makes it nearly uniform (T = 20, a = 0.1: the ResNet-18 constants). The
    student's logits are not temperature-scaled and there is no T^2.

    Reduction: batch-mean KL (summed over classes, averaged over the batch). The
    official code (yuanli2333/Teacher-free-Knowledge-Distillation) uses PyTorch's
    default 'mean' KL reduction, which divides by N * K, and compensates with a
    per-model multiplier; with the ResNet-18 constants that is in effect the
    batch-mean KL, which is what we implement, so the loss does not depend on a
    multiplier tied to K.
    """

    name = "tfkd_reg"

    def __init__(self, T: float = 20.0, a: float = 0.1, correct_prob: float = 0.99):
        self.T = in_range(self.name, "T", T, 0, low_open=True)
        self.a = in_range(self.name, "a", a, 0, 1)
        self.correct_prob = in_range(self.name, "correct_prob", correct_prob, 0, 1, low_open=True, high_open=True)

    def loss(self, logits, batch, epoch):
        K = logits.shape[1]
        p_d = torch.full(logits.shape, (1 - self.correct_prob) / (K - 1), device=logits.device)
        p_d[torch.arange(len(batch.labels), device=logits.device), batch.labels] = self.correct_prob
        target = F.softmax(p_d / self.T, dim=1)
        return (1 - self.a) * cross_entropy(logits, batch.labels) + self.a * soft_loss(target, logits)


# ---------------------------------------------------------------- self-distillation

class CSKD(Objective):
    """CS-KD (Yun et al. 2020): ``CE(z(x), y) + lam * T^2 * KL(softmax(z(x')/T) || softmax(z(x)/T))``.

    For every anchor x a partner x' is drawn uniformly from the training images of
    the anchor's class (the anchor itself included) and augmented independently;
    z(x') is computed without gradient. As in the official code, the anchors and
    the partners go through the network in two separate train-mode forward
    passes, anchors first (the engine's order), so BatchNorm normalises each half
    with its own statistics and its running statistics are updated twice per step. The loop's
    batch size counts anchors only, so a step costs 1.5x a CE step (an extra
    forward). Defaults are the CIFAR-100 constants T = 4, lam = 1.
    """

    name = "cskd"
    extra_forwards = ("partner",)

    def __init__(self, T: float = 4.0, lam: float = 1.0):
        self.T, self.lam = in_range(self.name, "T", T, 0, low_open=True), in_range(self.name, "lam", lam, 0)

    def setup(self, config, train_labels, num_classes):
        # Training indices sorted by class: class k owns order[start[k] : start[k] + size[k]],
        # so drawing a same-class partner is one vectorised gather.
        self.order = torch.argsort(train_labels, stable=True)
        self.size = torch.bincount(train_labels, minlength=num_classes)
        self.start = torch.cumsum(self.size, 0) - self.size

    def partners(self, labels, generator):
        """Training indices of one uniformly drawn same-class partner per label."""
        # Modulo a 62-bit draw: the bias is below 1e-13 for any class size.
        draw = torch.randint(0, 2 ** 62, labels.shape, generator=generator, device=generator.device)
        return self.order[self.start[labels] + draw % self.size[labels]]

    def loss(self, logits, batch, epoch):
        target = F.softmax(batch.partner_logits.detach().float() / self.T, dim=1)
        return cross_entropy(logits, batch.labels) + self.lam * soft_loss(target, logits, self.T)


class PSKD(Objective):
    """PS-KD (Kim et al. 2021): soft cross-entropy to ``(1 - a_t) * onehot + a_t * P_prev[i]``.

    ``a_t = alpha_T * (t + 1) / E`` (t the 0-based epoch, E = ``config.epochs``).
    P_prev is an N x K table on the device indexed by training index, initialised
    to the one-hot labels and overwritten after every step with the detached
    softmax of that step's logits, i.e. the model's prediction on the augmented
    view of the sample's previous visit. Loss: batch-mean of
    ``sum_k -target_k log softmax(z)_k`` (no temperature). The table is state.
    """

    name = "pskd"

    def __init__(self, alpha_T: float = 0.8):
        self.alpha_T = in_range(self.name, "alpha_T", alpha_T, 0, 1)

    def setup(self, config, train_labels, num_classes):
        self.epochs = config.epochs
        self.num_classes = num_classes
        self.predictions = F.one_hot(train_labels, num_classes).float()

    def alpha(self, epoch: int) -> float:
        return self.alpha_T * (epoch + 1) / self.epochs

    def targets(self, labels: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        a = self.alpha(epoch)
        return (1 - a) * F.one_hot(labels, self.num_classes).float() + a * self.predictions[indices]

    def loss(self, logits, batch, epoch):
        target = self.targets(batch.labels, batch.indices, epoch)
        loss = soft_loss(target, logits, kl=False)
        # Stored now rather than after the optimiser step: the same detached
        # prediction, read only at the sample's next visit.
        self.predictions[batch.indices] = F.softmax(logits.detach().float(), dim=1)
        return loss

    def state_dict(self):
        return {"predictions": self.predictions}

    def load_state_dict(self, state):
        self.predictions.copy_(state["predictions"])


# ---------------------------------------------------------------- Confusion Distillation

# Hard/soft segment lengths in epochs, starting hard (the paper's Section 4.2: the best 200- and 300-epoch
# rows of its Table 1).
CD_SCHEDULES: dict[str, list[int]] = {
    "cd200": [30, 30, 30, 30, 80],
    "cd300": [30, 30, 60, 30, 150],
}


def resolve_cd_schedule(schedule: str | list[int]) -> list[int]:
    """A preset name from ``CD_SCHEDULES`` or a list of positive segment lengths -> the list."""
    if isinstance(schedule, str):
        if schedule not in CD_SCHEDULES:
            raise ConfigError(f"unknown CD schedule {schedule!r}; presets: {sorted(CD_SCHEDULES)}")
        return list(CD_SCHEDULES[schedule])
    whole = isinstance(schedule, (list, tuple)) and all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                        for s in schedule)
    if not whole or not schedule or min(schedule) < 1:
        raise ConfigError(f"a CD schedule is a preset name or a non-empty list of positive whole epochs, "
                          f"got {schedule!r}")
    segments = [int(s) for s in schedule]
    return segments


def cd_phase(schedule: str | list[int], epoch: int) -> str:
    """``"hard"`` or ``"soft"``: the phase of 0-based ``epoch`` (segments alternate, starting hard)."""
    segments = resolve_cd_schedule(schedule)
    if epoch >= 0:
        for i, end in enumerate(itertools.accumulate(segments)):
            if epoch < end:
                return "hard" if i % 2 == 0 else "soft"
    raise ValueError(f"epoch {epoch} is outside schedule {segments} ({sum(segments)} epochs)")


def cd_ema_updates(schedule: str | list[int], epoch: int) -> bool:
    """Whether Q~ is updated after 0-based ``epoch``: from the end of the first hard
    phase on, hard phases included (the released code), so the first soft epoch
    already sees one update."""
    return epoch >= resolve_cd_schedule(schedule)[0] - 1


class ConfusionDistillation(Objective):
    """Confusion Distillation (the paper's Sections 4.2 and 4.4): self-distillation to EMA confusion rows.

    State Q~ (C x C) starts as the label-smoothing matrix S (``smoothing_matrix``,
    eps = 0.1). After every epoch for which ``cd_ema_updates`` holds,
    ``Q~ <- mu * Q~ + (1 - mu) * Q(t)`` with mu = 0.9 and Q(t) the hard confusion
    counts plus 1e-8, row-normalised (as the released code; the 1e-8 keeps every
    row a distribution). A sample of class k in a soft phase has loss
    ``w_soft * T^2 * KL(R[k] || softmax(z / T)) + w_ce * CE`` (0.7 / 0.3, T = 2,
    target row not temperature-scaled), where R is the target matrix derived from
    Q~ below; hard phases use CE only. ``schedule`` is a ``CD_SCHEDULES`` name or
    a list of alternating hard/soft segment lengths and must sum to ``config.epochs``.

    ``source`` says where Q(t) comes from:
      * ``"train"`` (default): the training confusion gathered during the epoch,
        i.e. argmax of the train-mode logits on that epoch's augmented training
        images. Leak-free: only training labels enter the targets.
      * ``"holdout"``: the confusion of the held-out validation split (eval mode), so
        the targets are held-out predictions as in the released code, without the
        test set. Needs ``TrainConfig.validation > 0``.
      * ``"train_eval"``: eval-mode predictions on the un-augmented training images,
        one extra inference pass per EMA update. Leak-free, and free of the
        train-mode and augmentation parts of ``"train"``'s bias (not of fitting).
      * ``"test"``: the test-split confusion, as the released code does. Test labels
        then leak into the training targets, so it needs ``allow_test_leak=True``
        and warns at setup; use it only to reproduce the released numbers.

    ``targets`` chooses R (the referee's ablations; Q~ itself is always the EMA):
      * ``"confusion"``: R = Q~.
      * ``"diagonal"``: R[k, k] = Q~[k, k] and R[k, j] = (1 - Q~[k, k]) / (C - 1)
        for j != k: label smoothing whose per-class strength follows the EMA
        accuracy of class k, with no information about which classes are confused.
      * ``"shuffled"``: each row's off-diagonal entries of Q~ permuted within the
        row by a fixed permutation per row, drawn once from ``config.seed``: the
        same diagonal and the same multiset of off-diagonal values per row, no
        class structure.
      * ``"static"``: R = S for ever (Q~ is never updated, ``source`` is unused):
        label smoothing at CD's prior with CD's schedule, weights and T. It is a
        ``targets`` value rather than a separate objective because it differs from
        CD only in the target matrix, so all ablations vary one argument.
    All four start at S (S is invariant under the diagonal and shuffle maps).
    """

    name = "cd"
    SOURCES = ("train", "holdout", "train_eval", "test")
    TARGETS = ("confusion", "diagonal", "shuffled", "static")

    def __init__(self, schedule: str | list[int], source: str = "train", targets: str = "confusion",
                 allow_test_leak: bool = False, T: float = 2.0, w_soft: float = 0.7, w_ce: float = 0.3,
                 mu: float = 0.9, eps: float = 0.1):
        if source not in self.SOURCES:
            raise ConfigError(f"CD source must be one of {self.SOURCES}, got {source!r}")
        if targets not in self.TARGETS:
            raise ConfigError(f"CD targets must be one of {self.TARGETS}, got {targets!r}")
        if source == "test" and not allow_test_leak:
            raise ConfigError(
                "CD with source='test' builds the training targets from the test split's confusion "
                "matrix, so test labels leak into training and test accuracy is no longer a held-out "
                "measurement. It only exists to reproduce the released code; pass allow_test_leak=True "
                "to select it knowingly, or use source='train'.")
        self.schedule = resolve_cd_schedule(schedule)
        self.source, self.targets = source, targets
        self.T = in_range(self.name, "T", T, 0, low_open=True)
        self.w_soft, self.w_ce = in_range(self.name, "w_soft", w_soft, 0), in_range(self.name, "w_ce", w_ce, 0)
        self.mu = in_range(self.name, "mu", mu, 0, 1, high_open=True)
        self.eps = in_range(self.name, "eps", eps, 0, 1)

    def check(self, config):
        if sum(self.schedule) != config.epochs:
            raise ConfigError(f"CD schedule {self.schedule} covers {sum(self.schedule)} epochs, "
                              f"the run has {config.epochs}")
        if self.source == "holdout" and not config.validation:
            raise ConfigError("CD with source='holdout' builds its targets from the validation split, and this "
                              "run holds none out: set TrainConfig.validation (e.g. 5000), or use source='train'")

    def _updates(self, epoch: int) -> bool:
        return self.targets != "static" and cd_ema_updates(self.schedule, epoch)

    def needs_train_eval(self, epoch):
        return self.source == "train_eval" and self._updates(epoch)

    def setup(self, config, train_labels, num_classes):
        if self.source == "test":
            warnings.warn("Confusion Distillation with source='test': the EMA targets are built from "
                          "test-set predictions and labels (test labels leak into training), as in the "
                          "released code. Test accuracy of this run is not a held-out measurement.",
                          stacklevel=2)
        C, device = num_classes, train_labels.device
        self.ema = smoothing_matrix(C, self.eps, device)
        self.updates = 0       # EMA updates applied so far
        self.epochs_seen = 0   # end_epoch calls so far = the next epoch to end
        if self.targets == "shuffled":
            # Column indices j != k of each row k, and a fixed permutation of them per row.
            columns = torch.arange(C).repeat(C, 1)[~torch.eye(C, dtype=torch.bool)].view(C, C - 1)
            self.off_diagonal = columns.to(device)
            generator = torch.Generator().manual_seed(config.seed)
            self.shuffle = torch.rand(C, C - 1, generator=generator).argsort(1).to(device)
        self._refresh_targets()

    def phase(self, epoch: int) -> str:
        return cd_phase(self.schedule, epoch)

    def target_matrix(self) -> torch.Tensor:
        """(C, C) float64 soft targets R derived from Q~ (row k for class k), see the class doc."""
        Q = self.ema
        if self.targets == "diagonal":
            C = Q.shape[0]
            R = ((1 - Q.diagonal()) / (C - 1)).unsqueeze(1).repeat(1, C)
            R.diagonal().copy_(Q.diagonal())
            return R
        if self.targets == "shuffled":
            return Q.scatter(1, self.off_diagonal, Q.gather(1, self.off_diagonal.gather(1, self.shuffle)))
        return Q.clone()  # "confusion", and "static" whose Q~ stays S

    def _refresh_targets(self):
        # Kept in float32 for the loss; recomputed only when Q~ changes.
        self._targets = self.target_matrix().float()

    def loss(self, logits, batch, epoch):
        ce = cross_entropy(logits, batch.labels)
        if self.phase(epoch) == "hard":
            return ce
        soft = soft_loss(self._targets[batch.labels], logits, self.T)
        return self.w_soft * soft + self.w_ce * ce

    def end_epoch(self, info):
        if info.epoch != self.epochs_seen:
            raise ValueError(f"CD expected the end of epoch {self.epochs_seen}, got epoch {info.epoch}: "
                             "epochs ended out of order or the objective state was not restored")
        self.epochs_seen += 1
        if not self._updates(info.epoch):
            return
        # "train" is sound because it uses training labels only. Its bias: the
        # predictions are train-mode (batch statistics) argmaxes on augmented
        # training images the model is fitting, so late in training they are more
        # accurate than held-out predictions and the rows grow more diagonal
        # (less off-diagonal mass) than a test-set confusion would be.
        counts = {"train": info.train_confusion, "holdout": info.validation_confusion,
                  "train_eval": info.train_eval_confusion, "test": info.test_confusion}[self.source]
        Q_t = counts.to(self.ema) + 1e-8
        Q_t = Q_t / Q_t.sum(1, keepdim=True)
        self.ema.mul_(self.mu).add_(Q_t, alpha=1 - self.mu)
        self.updates += 1
        self._refresh_targets()

    def state_dict(self):
        state = {"ema": self.ema, "updates": self.updates, "epochs_seen": self.epochs_seen}
        if self.targets == "shuffled":
            state["shuffle"] = self.shuffle
        return state

    def load_state_dict(self, state):
        self.ema.copy_(state["ema"])
        self.updates = int(state["updates"])
        self.epochs_seen = int(state["epochs_seen"])
        if self.targets == "shuffled":
            self.shuffle.copy_(state["shuffle"])
        self._refresh_targets()


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CrossEntropy, LabelSmoothing, KnowledgeDistillation, TfKDReg, CSKD, PSKD,
                              ConfusionDistillation)
}


def make_objective(name: str, args: dict[str, Any] | None = None) -> Objective:
    """The objective ``name`` with keyword arguments ``args``; unknown, missing or out-of-range
    arguments raise a ``ConfigError`` that lists the accepted ones."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    cls, args = OBJECTIVES[name], dict(args or {})
    signature = inspect.signature(cls)
    try:
        signature.bind(**args)
    except TypeError as err:
        accepted = ", ".join(f"{p.name}" + ("" if p.default is p.empty else f"={p.default!r}")
                             for p in signature.parameters.values())
        raise ConfigError(f"objective {name!r}: {err}; it accepts ({accepted or 'no arguments'})") from err
    return cls(**args)
