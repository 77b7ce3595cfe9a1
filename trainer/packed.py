"""The packed recipe: K trials that differ only in packable fields, trained as one computation.

Beside the solo recipe (trainer/recipe.py), sharing its data, models, optimizers' settings
and schedules. Each trial is built by a solo `Trainer`'s own `setup()` (its *shadow*), so
its seed fixes its initial weights, data split and data order exactly as alone; the pack
then trains the trials' weights stacked (trainer/packed_models.py) with the optimizers'
rules over stacked state (trainer/packed_optim.py), and each trial reports through its own
reporter: the same metric names at the same steps, its own progress, its own `should_stop`
(a trial told to stop ends alone and is dropped from the stacked state, so its compute
stops), its own checkpoints in the solo format (written through its shadow, so a trial
resumes packed or alone), its own failure (a diverging trial fails alone).

What packs (`packable`): the same dataset, model, batch size, epochs, loss, optimizer family,
device, checkpoint cadence; what may differ: the seed, the optimizer's hyperparameters, the
schedule, gradient clipping, the logging interval, the name and bookkeeping fields.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.packing import PACKABLE_FIELDS, SLOWER_PACKED_ON_CPU, pack_key, unpackable_reason
from jobs.spec import JobSpec
from trainer.data import RawData
from trainer.packed_models import StackedNetwork, unsupported_layers
from trainer.packed_optim import STACKED_OPTIMIZERS, StackedOptimizer
from trainer.recipe import EVAL_CHUNK, SYNC_WINDOW_STEPS, Trainer, TrainingPosition, confusion_matrix, resolve_device
from trainer.reporting import NullReporter, Reporter, TrainingDiverged, TrainingResult

# Measured with bench/packing.py on this 2-core CPU: a pack of recurrent trials ran at 0.5x of
# the same trials one after another (the stacked cell steps from Python, and K trials' gates
# outgrow the caches that torch's own cell works in); on a GPU the launches it saves dominate.
# (SLOWER_PACKED_ON_CPU, with the spec-side rules pack_key and unpackable_reason, lives in
# jobs/packing.py: the worker claiming a pack's mates and a study sizing its queue read it too.)


def not_worthwhile_reason(spec: JobSpec) -> str | None:
    if spec.model.arch in SLOWER_PACKED_ON_CPU and resolve_device(spec.device).type == "cpu":
        return f"{spec.model.arch} on a CPU trains faster alone than packed (bench/packing.py)"
    return None


def packable(
    specs: list[JobSpec], max_size: int = 16, worthwhile: bool = True
) -> tuple[list[list[int]], dict[int, str]]:
    """(groups of indices into specs to train as packs of at most max_size, {index: why not}).

    worthwhile=False: every pack that trains correctly, even where packing is measured slower."""
    reasons: dict[int, str] = {}
    by_key: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        reason = unpackable_reason(spec) or (not_worthwhile_reason(spec) if worthwhile else None)
        if reason is not None:
            reasons[i] = reason
        else:
            by_key.setdefault(pack_key(spec), []).append(i)
    groups = [members[s : s + max_size] for members in by_key.values() for s in range(0, len(members), max_size)]
    return groups, reasons


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), labels.reshape(-1), reduction="none").view(k, b).mean(1)


def _softmax_mse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return (torch.softmax(logits, dim=-1) - target).square().mean(dim=(1, 2))


# name -> (logits [K, B, C], labels [K, B]) -> each trial's mean loss [K]: trainer/losses.py, per trial.
PER_TRIAL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": _softmax_mse,
}


class PackedTrainer:
    def __init__(
        self,
        specs: list[JobSpec],
        reporters: list[Reporter] | None = None,
        checkpoint_every_steps: int | None = None,
        raw_data: RawData | None = None,
        datasets_dir: Path | None = None,
        fused_optimizer: bool = False,
    ) -> None:
        groups, reasons = packable(specs, max_size=len(specs), worthwhile=False)
        if reasons:
            raise ValueError("; ".join(f"trial {i}: {why}" for i, why in sorted(reasons.items())))
        if len(groups) != 1:
            raise ValueError("the trials differ in more than their packable fields: " + ", ".join(sorted(PACKABLE_FIELDS)))
        self.specs = specs
        self.spec = specs[0]  # what the trials share
        self.reporters = list(reporters or [NullReporter() for _ in specs])
        self.checkpoint_every = checkpoint_every_steps
        self.fused_optimizer = fused_optimizer  # torch's fused kernels where they exist (False: broadcast rules)
        self.shadows = [Trainer(s, NullReporter(), raw_data=raw_data, datasets_dir=datasets_dir) for s in specs]
        self.results: list[TrainingResult | TrainingDiverged | None] = [None] * len(specs)

    def setup(self) -> None:
        self.generators: list[torch.Generator] = []  # each trial's dropout stream, where its solo run has it
        for shadow in self.shadows:
            shadow.setup()  # seeds the global generators and builds in the solo order
            self.generators.append(self._copy_of_global_generator(shadow.device))
            shadow.optimizer._opt_called = True  # the shadow's schedule is stepped as a clock, without its optimizer
        self.device = self.shadows[0].device
        self.loss_fn = PER_TRIAL_LOSSES[self.spec.loss]
        for shadow in self.shadows:
            bad = unsupported_layers(shadow.model)
            if bad:
                raise ValueError(f"{self.spec.model.arch} holds layers a pack does not stack: {', '.join(bad)}")
        self.active = list(range(len(self.shadows)))  # indices of the trials still training
        self._stack()

    @staticmethod
    def _copy_of_global_generator(device: torch.device) -> torch.Generator:
        generator = torch.Generator(device)
        generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
        return generator

    def _stack(self) -> None:
        """Stack the active trials' shadows: weights, optimizer state, data, position."""
        shadows = [self.shadows[i] for i in self.active]
        self.network = StackedNetwork([s.model for s in shadows], self.device)
        optimizer_class = STACKED_OPTIMIZERS[self.spec.optimizer.name]
        groups = [{k: v for k, v in s.optimizer.param_groups[0].items() if k != "params"} for s in shadows]
        self.optimizer: StackedOptimizer = optimizer_class(groups, sum(self.network.sizes), self.device)
        self.optimizer.import_from([s.optimizer for s in shadows], self.network.flatten)
        self.optimizer.use_fused = self.fused_optimizer
        self.x_train = torch.stack([s.data.x_train for s in shadows])
        self.y_train = torch.stack([s.data.y_train for s in shadows])
        self.x_val = torch.stack([s.data.x_val for s in shadows])
        self.y_val = torch.stack([s.data.y_val for s in shadows])
        clips = [s.spec.clip_grad_norm for s in shadows]
        self.clip = None if all(c is None for c in clips) else torch.tensor(
            [float("inf") if c is None else c for c in clips], device=self.device
        ).view(-1, 1)
        positions = [s.position for s in shadows]
        first = positions[0]
        if any((p.step, p.epoch, p.batch_start) != (first.step, first.epoch, first.batch_start) for p in positions):
            raise ValueError("the trials are at different steps: resume them one by one")
        self.position = TrainingPosition(step=first.step, epoch=first.epoch, batch_start=first.batch_start)
        if first.order is not None:
            self.position.order = torch.stack([p.order for p in positions])
            if first.predictions:
                self.position.predictions = [torch.stack([torch.cat(p.predictions) for p in positions])]
        self.generators_active = [self.generators[k] for k in self.active]
        self._index_samples()

    def _index_samples(self) -> None:
        """Each trial's order as indices into all trials' samples laid end to end: one
        index_select gathers every trial's own batch."""
        k, n = self.x_train.shape[:2]
        self.x_samples = self.x_train.reshape(k * n, *self.x_train.shape[2:])
        self.y_samples = self.y_train.reshape(k * n)
        if self.position.order is not None:
            self.gather_order = self.position.order + torch.arange(k, device=self.device).view(-1, 1) * n

    # -- resuming

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue every trial from its own checkpoint (solo `state_dict()`s); call after `setup()`."""
        for k, (shadow, state) in enumerate(zip(self.shadows, states)):
            shadow.load_state_dict(state)
            rng = state["rng"]
            if self.device.type == "cuda" and rng["cuda"]:
                self.generators[k].set_state(rng["cuda"][0].cpu())
            else:
                self.generators[k].set_state(rng["torch"].cpu())
        self._stack()

    def state_dict(self, k: int) -> dict[str, Any]:
        """Trial k's checkpoint in the solo format (its shadow's state_dict, brought up to date)."""
        row = self.active.index(k)
        shadow, pos = self.shadows[k], self.position
        self.network.write_row(row, shadow.model)
        self.optimizer.export_to(row, shadow.optimizer, self.network.unflatten)
        shadow.position = TrainingPosition(
            step=pos.step,
            epoch=pos.epoch,
            batch_start=pos.batch_start,
            order=None if pos.order is None else pos.order[row],
            predictions=[torch.cat([p[row] for p in pos.predictions])] if pos.predictions else [],
        )
        state = shadow.state_dict()
        if self.device.type == "cuda":
            state["rng"]["cuda"] = [self.generators[k].get_state()]
        else:
            state["rng"]["torch"] = self.generators[k].get_state()
        return state

    # -- the loop

    def train(self) -> list[TrainingResult | TrainingDiverged]:
        """Each trial's result, or the divergence it failed with, in the order of the specs."""
        spec, pos = self.spec, self.position
        n_train = self.x_train.shape[1]
        while self.active and (pos.order is not None or pos.epoch < spec.epochs):
            if pos.order is None:  # a new epoch: each trial's order from its own generator
                pos.epoch += 1
                orders = [torch.randperm(n_train, generator=self.shadows[k].order_generator) for k in self.active]
                pos.order = torch.stack(orders).to(self.device)
                self._index_samples()
                pos.batch_start = 0
                pos.predictions = []
            while pos.batch_start < n_train and self.active:
                self._train_window(n_train)
            if not self.active:
                break
            self._epoch_end(self.active)
            pos.order = None
            if self.checkpoint_every:
                self._checkpoint()
        if self.active:
            self._finish(list(self.active), stopped=False)
        return self.results  # type: ignore[return-value]

    def _window_length(self, n_train: int) -> int:
        """Steps until the next report: a full window, the epoch's end, or a checkpoint."""
        pos, batch = self.position, self.spec.batch_size
        left_in_epoch = -(-(n_train - pos.batch_start) // batch)
        length = min(SYNC_WINDOW_STEPS, left_in_epoch)
        if self.checkpoint_every:
            length = min(length, self.checkpoint_every - pos.step % self.checkpoint_every)
        return length

    def _lr_clock(self, n: int) -> np.ndarray:
        """The next n steps' learning rates [n, K], from each trial's own solo schedule.

        Trials with the same schedule and base lr (seed repeats) have the same learning rates:
        one of them steps its schedule, the others take a copy of its state."""
        lrs = np.empty((n, len(self.active)))
        leaders: dict[str, int] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the schedule stepped without its optimizer: on purpose
            for j, k in enumerate(self.active):
                shadow = self.shadows[k]
                key = shadow.spec.schedule.model_dump_json() + repr(shadow.spec.optimizer.lr)
                leader = leaders.setdefault(key, j)
                if leader != j:
                    source = self.shadows[self.active[leader]]
                    lrs[:, j] = lrs[:, leader]
                    shadow.schedule.load_state_dict(copy.deepcopy(source.schedule.state_dict()))
                    shadow.optimizer.param_groups[0]["lr"] = source.optimizer.param_groups[0]["lr"]
                    continue
                group = shadow.optimizer.param_groups[0]
                for i in range(n):
                    lrs[i, j] = group["lr"]
                    shadow.schedule.step()
        return lrs

    def _train_window(self, n_train: int) -> None:
        spec, pos, net, opt = self.spec, self.position, self.network, self.optimizer
        n = self._window_length(n_train)
        clocks = [(self.shadows[k].schedule.state_dict(), self.shadows[k].optimizer.param_groups[0]["lr"]) for k in self.active]
        lrs = self._lr_clock(n)
        plan = opt.window(lrs)
        losses, norms, steps = [], [], []
        stopping: list[int] = []
        for i in range(n):
            batch = self.gather_order[:, pos.batch_start : pos.batch_start + spec.batch_size]
            k, b = batch.shape
            flat_batch = batch.reshape(-1)
            inputs = self.x_samples.index_select(0, flat_batch).view(k, b, *self.x_samples.shape[1:])
            logits = net.forward(inputs, True, self.generators_active)
            loss = self.loss_fn(logits, self.y_samples.index_select(0, flat_batch).view(k, b))
            net.flat.grad = None
            loss.sum().backward()  # trials are independent: each row's gradient is its own loss's
            grad = net.flat.grad
            with torch.no_grad():
                norm = torch.linalg.vector_norm(grad, dim=1)  # each trial's global gradient norm, before clipping
                if self.clip is not None:  # clip_grad_norm_'s rule, per trial (inf: not clipped)
                    grad.mul_((self.clip / (norm.unsqueeze(1) + 1e-6)).clamp_(max=1.0))
                opt.update(net.flat, grad, plan, i)
            losses.append(loss.detach())
            norms.append(norm)
            steps.append(pos.step)
            pos.predictions.append(logits.detach().argmax(dim=2))
            pos.batch_start += spec.batch_size
            pos.step += 1
            for k in self.active:  # as the solo loop asks: after every step
                reporter = self.reporters[k]
                reporter.progress(pos.epoch, pos.step)
                if reporter.should_stop() and pos.step < spec.total_steps:
                    stopping.append(k)
            if stopping:
                break
        if len(steps) < n:  # cut short: the survivors' schedules go back to where the steps taken leave them
            for k, (state, lr) in zip(self.active, clocks):
                self.shadows[k].schedule.load_state_dict(state)
                self.shadows[k].optimizer.param_groups[0]["lr"] = lr
            self._lr_clock(len(steps))
        self._report_window(steps, lrs, losses, norms)
        # As the solo loop: a checkpoint due at this step first, then the trials told to stop end.
        if self.active and self.checkpoint_every and pos.step % self.checkpoint_every == 0 and pos.batch_start < n_train:
            self._checkpoint()
        stopping = [k for k in stopping if k in self.active]  # (not one that diverged meanwhile)
        if stopping:
            self._epoch_end(stopping)
            self._finish(stopping, stopped=True)

    def _report_window(self, steps: list[int], lrs: np.ndarray, losses: list, norms: list) -> None:
        """Each trial's metrics for the window; a trial whose loss went non-finite fails alone."""
        loss_rows = torch.stack(losses).T.tolist()  # [K][n]
        norm_rows = torch.stack(norms).T.tolist()
        diverged = []
        for j, k in enumerate(self.active):
            every = self.shadows[k].spec.log_every_steps
            for i, step in enumerate(steps):
                loss = loss_rows[j][i]
                if not np.isfinite(loss):
                    self.results[k] = TrainingDiverged(step, loss, float(lrs[i, j]))
                    diverged.append(k)
                    break
                if step % every == 0:
                    self.reporters[k].log_metrics(
                        step, {"train_loss": loss, "lr": float(lrs[i, j]), "grad_norm": norm_rows[j][i]}
                    )
        if diverged:
            self._drop(diverged)

    def _checkpoint(self) -> None:
        for k in self.active:
            self.reporters[k].save_checkpoint(self.position.step, lambda k=k: self.state_dict(k))

    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float], torch.Tensor]:
        """Each active trial's (mean loss, accuracy) over its own split, and its predictions [K, N]."""
        total = torch.zeros(len(self.active), device=self.device)
        predictions = []
        with torch.no_grad():
            for start in range(0, x.shape[1], EVAL_CHUNK):
                logits = self.network.forward(x[:, start : start + EVAL_CHUNK], False)
                total += self.loss_fn(logits, y[:, start : start + EVAL_CHUNK]) * logits.shape[1]
                predictions.append(logits.argmax(dim=2))
        predicted = torch.cat(predictions, dim=1)
        accuracy = (predicted == y).float().mean(dim=1)
        return (total / x.shape[1]).tolist(), accuracy.tolist(), predicted

    def _epoch_end(self, trials: list[int]) -> None:
        """The epoch's (or, for trials told to stop, the partial epoch's) metrics, as the solo loop logs them."""
        pos = self.position
        predicted = torch.cat(pos.predictions, dim=1)
        seen = pos.order[:, : predicted.shape[1]]
        train_accuracy = (predicted == torch.gather(self.y_train, 1, seen)).float().mean(dim=1).tolist()
        val_loss, val_accuracy, _ = self._evaluate(self.x_val, self.y_val)
        for k in trials:
            row = self.active.index(k)
            self.reporters[k].log_metrics(
                pos.step,
                {"epoch": pos.epoch, "train_accuracy": train_accuracy[row], "val_loss": val_loss[row],
                 "val_accuracy": val_accuracy[row]},
            )

    def _finish(self, trials: list[int], stopped: bool) -> None:
        """These trials' results (final evaluation, model as a solo module); then they are dropped."""
        val_loss, val_accuracy, predicted = self._evaluate(self.x_val, self.y_val)
        train_loss, train_accuracy, _ = self._evaluate(self.x_train, self.y_train)
        for k in trials:
            row = self.active.index(k)
            shadow = self.shadows[k]
            self.network.write_row(row, shadow.model)
            self.results[k] = TrainingResult(
                model=shadow.model,
                steps=self.position.step,
                epochs=self.position.epoch,
                stopped_early=stopped,
                final_metrics={
                    "train_loss": train_loss[row],
                    "train_accuracy": train_accuracy[row],
                    "val_loss": val_loss[row],
                    "val_accuracy": val_accuracy[row],
                },
                confusion_matrix=confusion_matrix(self.y_val[row], predicted[row], shadow.data.n_classes),
                class_names=shadow.data.class_names,
            )
        self._drop(trials)

    def _drop(self, trials: list[int]) -> None:
        """Stop spending compute on these trials: every stacked tensor loses their rows."""
        keep = [row for row, k in enumerate(self.active) if k not in trials]
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.active = [self.active[row] for row in keep]
        if not self.active:
            return
        self.network.keep(rows)
        self.optimizer.keep(rows)
        self.x_train, self.y_train = self.x_train[rows], self.y_train[rows]
        self.x_val, self.y_val = self.x_val[rows], self.y_val[rows]
        self.clip = None if self.clip is None else self.clip[rows]
        pos = self.position
        pos.order = None if pos.order is None else pos.order[rows]
        pos.predictions = [p[rows] for p in pos.predictions]
        self.generators_active = [self.generators[k] for k in self.active]
        self._index_samples()
