"""The training recipe: spec -> data, model, optimizer, schedule -> loop.

Read top to bottom: `Trainer(spec)` rejects what cannot run before touching data,
`setup()` builds everything in a fixed order (the order fixes the random streams,
so the same seed gives the same initial weights and data order whatever the
optimizer), `train()` runs the loop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.spec import ImageDataset, JobSpec
from trainer.augment import BatchAugmentation
from trainer.data import RawData, SplitData, load_split
from trainer.diagnostics import StepProbes
from trainer.explosion_watch import DeviceExplosionWatch
from trainer.losses import LOSS_FUNCTIONS
from trainer.models import MODEL_BUILDERS
from trainer.optim import build_optimizer
from trainer.reporting import NullReporter, Reporter, TrainingDiverged, TrainingResult
from trainer.run_diagnostics import RunDiagnostics
from trainer.schedules import build_schedule, schedule_stepper
from trainer.speed import DeviceOutOfMemory, SpeedSettings, is_out_of_memory

# Per-step values stay on the device and are read back in windows of this many
# steps: one host sync per window instead of one per step.
SYNC_WINDOW_STEPS = 32
CHECKPOINT_FORMAT = 1
EVAL_CHUNK = 8192


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{requested}' was requested but this worker has no CUDA device")
    return torch.device(requested)


class Trainer:
    def __init__(
        self,
        spec: JobSpec,
        reporter: Reporter | None = None,
        checkpoint_every_steps: int | None = None,
        raw_data: RawData | None = None,
        datasets_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.raw_data = raw_data  # an uploaded dataset's arrays (trainer/data.py load_split)
        self.datasets_dir = datasets_dir  # the dataset cache an image set is read from
        self.reporter = reporter or NullReporter()
        self.device = resolve_device(spec.device)
        self.loss_fn = LOSS_FUNCTIONS[spec.loss]
        self.checkpoint_every = checkpoint_every_steps
        self.position = TrainingPosition()
        # A precision this device cannot run is refused here, before any data is read.
        self.speed = SpeedSettings(spec.precision, spec.compile, spec.model.arch, self.device)

    def setup(self) -> None:
        try:
            self._setup()
        except Exception as exc:
            if is_out_of_memory(exc):
                raise self._out_of_memory(exc) from None
            raise

    def _setup(self) -> None:
        spec = self.spec
        if self.device.type == "cuda":  # this job's peak, whatever ran in this process before
            torch.cuda.reset_peak_memory_stats(self.device)
        random.seed(spec.seed)
        np.random.seed(spec.seed % 2**32)
        torch.manual_seed(spec.seed)  # initial weights and dropout masks
        self.data: SplitData = load_split(spec, self.device, self.raw_data, self.datasets_dir)
        self.model = MODEL_BUILDERS[spec.model.arch](spec.model, self.data.shape, self.data.n_classes)
        self.model = self.speed.prepare(self.model.to(self.device))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, spec.optimizer)
        self.schedule = build_schedule(self.optimizer, spec.schedule, spec.total_steps)
        self.step_schedule = schedule_stepper(self.schedule)
        # The range test's stopping rule, watched on the device every step; kept with the
        # trainer (not the loop) so that a checkpoint carries it and a resumed run continues it.
        stop_factor = getattr(spec.schedule, "stop_factor", None)
        self.explosion = DeviceExplosionWatch(stop_factor, self.device) if stop_factor else None
        # The module the training step calls (compiled ahead of the first step when the spec asks).
        self.step_model = self.speed.compiled(self.model, self._warm_up)
        # Draws from no global random stream: the same job trains the same with diagnostics on or off.
        self.diagnostics = RunDiagnostics(spec, self.model, self.optimizer, self.loss_fn, self.data, self.reporter)
        # Data order has its own generator: changing the model or optimizer never changes it.
        self.order_generator = torch.Generator().manual_seed(spec.seed)
        # Augmentation draws from a generator of its own too: turning it on never changes the data order.
        augment = spec.dataset.augment if isinstance(spec.dataset, ImageDataset) else None
        self.augmentation = (
            BatchAugmentation(augment, self.device, spec.seed) if augment is not None and augment.active else None
        )

    def _warm_up(self, compiled: torch.nn.Module) -> None:
        """Compile for every batch shape of the run (the full batch and the epoch's last one)
        with a forward and backward pass that leaves no trace: no optimizer step, the random
        streams and the buffers (batch-norm statistics) restored, the gradients dropped."""
        n_train, batch_size = len(self.data.x_train), self.spec.batch_size
        sizes = sorted({min(batch_size, n_train), n_train % batch_size or batch_size}, reverse=True)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        for size in sizes:
            with self.speed.autocast():
                loss = self.loss_fn(compiled(self.data.inputs(self.data.x_train[:size])), self.data.y_train[:size])
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)

    @torch.no_grad()
    def evaluate_on_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, accuracy, predictions) over a whole split as stored, in eval mode, not
        augmented, as tensors on the device: the caller reads them back in one sync."""
        self.model.eval()
        with self.speed.autocast():
            if len(x) <= EVAL_CHUNK:  # one chunk: the loss's own mean (the chunks' sum costs six tensor ops more)
                logits = self.model(self.data.inputs(x))
                mean_loss = self.loss_fn(logits, y).float()
                predicted = logits.argmax(dim=1)
            else:
                total_loss = torch.zeros((), device=self.device)
                predictions = []
                for start in range(0, len(x), EVAL_CHUNK):
                    logits = self.model(self.data.inputs(x[start : start + EVAL_CHUNK]))
                    total_loss += self.loss_fn(logits, y[start : start + EVAL_CHUNK]).float() * len(logits)
                    predictions.append(logits.argmax(dim=1))
                mean_loss = total_loss / len(x)
                predicted = torch.cat(predictions)
        self.model.train()
        accuracy = (predicted == y).float().mean()
        return mean_loss, accuracy, predicted

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(mean loss, accuracy, predictions) over a whole split as stored, in eval mode, not augmented."""
        loss, accuracy, predicted = self.evaluate_on_device(x, y)
        loss_value, accuracy_value = torch.stack([loss, accuracy]).tolist()
        return loss_value, accuracy_value, predicted

    def train(self) -> TrainingResult:
        try:
            return self._train()
        except Exception as exc:
            if is_out_of_memory(exc):
                raise self._out_of_memory(exc) from None
            raise

    def _out_of_memory(self, exc: BaseException) -> DeviceOutOfMemory:
        """The job's failure in words: the traceback of an allocation says nothing to the person who sent it."""
        model = getattr(self, "model", None)
        parameters = None if model is None else sum(p.numel() for p in model.parameters())
        return DeviceOutOfMemory(self.device, self.spec.batch_size, parameters, self.spec.precision, str(exc))

    def _train(self) -> TrainingResult:
        spec, data, model, pos = self.spec, self.data, self.model, self.position
        n_train, batch_size = len(data.x_train), spec.batch_size
        x_train, y_train = data.x_train, data.y_train
        log_every = spec.log_every_steps
        clip = spec.clip_grad_norm
        probes = self.diagnostics.probes  # None unless the spec asks for in-loop probes
        explosion = self.explosion  # None unless this is an lr range test
        window = StepWindow(self.reporter, probes, explosion)
        if self.speed.scaler is not None:
            window.count_skipped_steps(self.speed.scaler, pos)
        # The step's callables, looked up once: each attribute lookup is paid on every step.
        step_model, loss_fn, augmentation = self.step_model, self.loss_fn, self.augmentation
        inputs = None if data.images is None else data.training_inputs  # None: stored as the model reads them
        optimizer, params, step_schedule = self.optimizer, self.params, self.step_schedule
        # The optimizer's own step, not the wrapper a torch scheduler puts around it (~3 us a
        # step, only to notice a scheduler stepped before the optimizer; said once here).
        optimizer_step = type(optimizer).step.__get__(optimizer)
        optimizer._opt_called = True
        scaler = self.speed.scaler
        autocast = self.speed.autocast if self.speed.autocast_dtype is not None else None
        add_to_window, window_steps = window.add, window.steps  # (drain() empties the lists in place)
        reporter, checkpoint_every = self.reporter, self.checkpoint_every
        if self.speed.compile_seconds is not None:  # (spent in setup: no step's rate includes it)
            reporter.log_metrics(pos.step, {"compile_seconds": self.speed.compile_seconds})
        stopped = False
        model.train()
        while not stopped and (pos.order is not None or pos.epoch < spec.epochs):
            if pos.order is None:  # a new epoch
                pos.epoch += 1
                pos.order = torch.randperm(n_train, generator=self.order_generator).to(self.device)
                pos.batch_start = 0
                pos.predictions, pos.logits = [], []  # for the epoch's running train accuracy
            order, batch_start, step, logits_seen = pos.order, pos.batch_start, pos.step, pos.logits
            while batch_start < n_train:
                batch = order[batch_start : batch_start + batch_size]
                # fp32 runs the forward pass outside any `with`: entering and leaving even a
                # nullcontext are two Python calls a step (~2,000 instructions).
                if autocast is None:
                    x = x_train[batch] if inputs is None else inputs(x_train[batch], augmentation)
                    logits = step_model(x)
                    loss = loss_fn(logits, y_train[batch])
                else:
                    with autocast():
                        x = x_train[batch] if inputs is None else inputs(x_train[batch], augmentation)
                        logits = step_model(x)
                        loss = loss_fn(logits, y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                else:
                    scaler.scale(loss).backward()
                probing = probes is not None and probes.due(step)
                logged = step % log_every == 0
                if scaler is not None and (probing or logged or clip is not None):
                    scaler.unscale_(optimizer)  # the gradients' true values, for the norm, clipping and probes
                if probing:
                    probes.before_step(step)  # gradients as backward left them, before any clipping
                norm_parts = None
                if clip is not None:  # clip_grad_norm_ returns the norm from before clipping
                    norm_parts = [torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)]
                elif logged:  # per-parameter norms; one global norm per step is made once per window
                    # (each `p.grad` is a torch getter of ~500 instructions: read once per parameter)
                    norm_parts = torch._foreach_norm([g for p in params if (g := p.grad) is not None])
                lr = optimizer.param_groups[0]["lr"]
                if scaler is None:
                    optimizer_step()
                else:
                    scaler.step(optimizer)  # skips the step when the gradients overflowed
                    scaler.update()
                if probing:
                    probes.after_step()  # the update just made, at the lr it was made with
                if step_schedule is not None:
                    step_schedule()
                add_to_window(step, lr, loss.detach(), norm_parts if logged else None, scaler)
                if explosion is not None:
                    explosion.update(step, loss)  # on the device: read back with the window
                # The running train accuracy: the logits are kept (detached) and reduced to
                # predictions once per window, not one argmax per step.
                logits_seen.append(logits.detach())
                batch_start += batch_size
                step += 1
                pos.batch_start, pos.step = batch_start, step
                # A range test's windows end at fixed steps (multiples of SYNC_WINDOW_STEPS),
                # whatever drained them in between (a checkpoint): where the loop can stop on an
                # explosion it read back does not depend on the checkpoint cadence. Other runs
                # drain a full window (an epoch shorter than a window drains once, at its end).
                if explosion is None:
                    window_end = len(window_steps) >= SYNC_WINDOW_STEPS
                else:
                    window_end = step % SYNC_WINDOW_STEPS == 0
                if window_end:
                    window.drain()
                    pos.fold_logits()  # memory stays bounded by one window's logits
                if checkpoint_every and step % checkpoint_every == 0 and batch_start < n_train:
                    self._checkpoint(window)  # (an epoch's last step is checkpointed at the epoch's end)
                reporter.progress(pos.epoch, step)
                if reporter.should_stop() and step < spec.total_steps:
                    stopped = True  # (after the last step there is nothing left to stop)
                    break
                if window_end and explosion is not None and explosion.exploded_at is not None and step < spec.total_steps:
                    stopped = True
                    break
            window.drain()
            stopped = stopped or (explosion is not None and explosion.exploded_at is not None)
            predicted = pos.epoch_predictions()
            train_acc = (predicted == y_train[order[: len(predicted)]]).float().mean()
            val_loss, val_acc, _ = self.evaluate_on_device(data.x_val, data.y_val)
            # One read-back for the epoch's three values.
            train_acc, val_loss, val_acc = torch.stack([train_acc, val_loss, val_acc]).tolist()
            epoch_metrics = {"epoch": pos.epoch, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc}
            if scaler is not None:
                epoch_metrics |= {"fp16_skipped_steps": pos.skipped_steps, "loss_scale": scaler.get_scale()}
            reporter.log_metrics(self._reported_step(), epoch_metrics)
            if not stopped:
                stopped = self.diagnostics.at_epoch_end(pos.epoch, pos.step)  # True: told to stop meanwhile
                pos.order = None
                if self.checkpoint_every:
                    self._checkpoint(window)

        self._sync_schedule()
        val_loss, val_acc, predicted = self.evaluate(data.x_val, data.y_val)
        train_loss, train_acc, _ = self.evaluate(data.x_train, data.y_train)
        confusion = confusion_matrix(data.y_val, predicted, data.n_classes)
        if self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.reporter.log_metrics(self._reported_step(), {"gpu_peak_memory_mb": peak_mb})
        summary: dict[str, Any] = {}  # a cancelled job stops now: no end-of-run diagnostics
        if self.diagnostics.active and not stopped:
            summary = self.diagnostics.at_end(pos.step, confusion, data.class_names)
            stopped = self.diagnostics.interrupted  # a cancel or timeout heard during them
        exploded_at = None if explosion is None else explosion.exploded_at
        return TrainingResult(
            model=model,
            steps=self._reported_step(),
            epochs=pos.epoch,
            stopped_early=stopped and exploded_at is None,
            stopped_by=None if exploded_at is None else "loss exploded at step {} (lr {:g})".format(*exploded_at),
            exploded_at_step=None if exploded_at is None else exploded_at[0],
            exploded_at_lr=None if exploded_at is None else exploded_at[1],
            final_metrics={
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
            },
            confusion_matrix=confusion,
            class_names=data.class_names,
            diagnostics=summary,
            landscape=self.diagnostics.landscape,
        )

    # -- exact resume

    def _checkpoint(self, window: StepWindow) -> None:
        window.drain()  # every metric up to this step is reported before the state that follows it
        self.reporter.save_checkpoint(self.position.step, self.state_dict)

    def _reported_step(self) -> int:
        """The steps the run counts: all it trained, or up to and including the step whose
        loss exploded (a range test). The loop reads the explosion back with its window, so
        it trained on to the window's end (a multiple of SYNC_WINDOW_STEPS or the epoch's
        end, the same steps whatever the checkpoint cadence); those steps are not counted."""
        exploded_at = None if self.explosion is None else self.explosion.exploded_at
        return self.position.step if exploded_at is None else min(self.position.step, exploded_at[0] + 1)

    def _sync_schedule(self) -> None:
        """A schedule that is not stepped per step (constant) gets the counters it would have."""
        if self.step_schedule is None:
            self.schedule.last_epoch = self.position.step
            self.schedule._step_count = self.position.step + 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (between two steps).

        The tensors are the live ones: serialise the dict before training goes on.
        numpy's and Python's generators are not used by the loop; they are kept so
        that code added later which draws from them resumes exactly too.
        """
        pos = self.position
        self._sync_schedule()
        numpy_state = np.random.get_state()
        return {
            "format": CHECKPOINT_FORMAT,
            "position": {
                "step": pos.step,
                "epoch": pos.epoch,
                "batch_start": pos.batch_start,
                "order": None if pos.order is None else pos.order.cpu(),
                "predictions": pos.epoch_predictions().cpu() if pos.predictions or pos.logits else None,
                "skipped_steps": pos.skipped_steps,
            },
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": None if self.speed.scaler is None else self.speed.scaler.state_dict(),
            "explosion": None if self.explosion is None else self.explosion.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "order": self.order_generator.get_state(),
                "augment": None if self.augmentation is None else self.augmentation.state_dict(),
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; call after `setup()`."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.speed.scaler is not None and state.get("scaler"):  # (checkpoints before fp16 lack it)
            self.speed.scaler.load_state_dict(state["scaler"])
        if self.explosion is not None and state.get("explosion"):  # (checkpoints before issue 15 lack it)
            self.explosion.load_state_dict(state["explosion"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())  # (generator states are CPU tensors, wherever the checkpoint was mapped)
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in rng["cuda"]])
        self.order_generator.set_state(rng["order"].cpu())
        if self.augmentation is not None and rng.get("augment") is not None:  # (checkpoints before augmentation lack it)
            self.augmentation.load_state_dict(rng["augment"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        random.setstate(tuple(rng["python"][:1]) + (tuple(rng["python"][1]),) + tuple(rng["python"][2:]))
        saved = state["position"]
        self.position = TrainingPosition(
            step=saved["step"],
            epoch=saved["epoch"],
            batch_start=saved["batch_start"],
            order=None if saved["order"] is None else saved["order"].to(self.device),
            predictions=[] if saved["predictions"] is None else [saved["predictions"].to(self.device)],
            skipped_steps=saved.get("skipped_steps", 0),
        )


@dataclass
class TrainingPosition:
    """Where the loop is: the step to run next, and the epoch it belongs to."""

    step: int = 0
    epoch: int = 0  # the current epoch (1-based) once started
    batch_start: int = 0  # first sample of the next batch in `order`
    order: torch.Tensor | None = None  # this epoch's data order; None between epochs
    predictions: list[torch.Tensor] = field(default_factory=list)  # this epoch's predicted labels so far
    logits: list[torch.Tensor] = field(default_factory=list)  # the latest steps' logits, not yet reduced
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped (overflowed gradients), in all

    def fold_logits(self) -> None:
        """The kept logits become predicted labels: one argmax for many steps."""
        if self.logits:
            self.predictions.append(torch.cat(self.logits).argmax(dim=1))
            self.logits.clear()  # (the loop holds this list: cleared, never replaced)

    def epoch_predictions(self) -> torch.Tensor:
        self.fold_logits()
        return torch.cat(self.predictions)


class StepWindow:
    """Per-step values left on the device, read back every SYNC_WINDOW_STEPS steps.

    Each tensor op costs microseconds even on tiny tensors, so the step does as few
    as it can: it keeps the loss and (on logged steps) the per-parameter gradient
    norms; reducing them to one global norm per step and copying them to the host
    happen once per window, in a couple of ops.
    """

    def __init__(
        self, reporter: Reporter, probes: StepProbes | None = None, explosion: DeviceExplosionWatch | None = None
    ) -> None:
        self.reporter = reporter
        # Optional on a reporter: log_metric_rows([(step, metrics), ...]) takes a window's rows at once.
        self.log_rows = getattr(reporter, "log_metric_rows", None)
        self.probes = probes  # their values are read back with the window's
        self.explosion = explosion  # the range test's: its first exploding step is read back here
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.losses: list[torch.Tensor] = []
        self.logged: list[int] = []  # positions of the steps whose metrics are logged
        self.norm_parts: list[torch.Tensor] = []
        # fp16: the loss scale after each step; a step that lowered it was skipped by the scaler.
        self.scales: list[torch.Tensor] = []
        self.scale_before = 0.0
        self.position: TrainingPosition | None = None

    def count_skipped_steps(self, scaler: torch.amp.GradScaler, position: TrainingPosition) -> None:
        self.scale_before = scaler.get_scale()  # (one read-back, before the loop)
        self.position = position

    def __len__(self) -> int:
        return len(self.steps)

    def add(
        self,
        step: int,
        lr: float,
        loss: torch.Tensor,
        norm_parts: list[torch.Tensor] | None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if scaler is not None:
            self.scales.append(scaler._scale.clone())  # the live scale is updated in place
        if norm_parts is not None:
            self.logged.append(len(self.steps))
            self.norm_parts.extend(norm_parts)
        self.steps.append(step)
        self.lrs.append(lr)
        self.losses.append(loss)

    def drain(self) -> None:
        """Report the window's metrics; fail on its first non-finite loss."""
        if self.probes is not None:
            self.probes.drain()
        if not self.steps:
            return
        losses = torch.stack(self.losses).tolist()
        norms: list[float] = []
        if self.logged:  # every logged step has the same number of parts
            parts = torch.stack(self.norm_parts).reshape(len(self.logged), -1)
            norms = torch.linalg.vector_norm(parts, dim=1).tolist()
        if self.scales:
            scales = [self.scale_before, *torch.cat([s.reshape(1) for s in self.scales]).tolist()]
            self.position.skipped_steps += sum(after < before for before, after in zip(scales, scales[1:]))
            self.scale_before, self.scales = scales[-1], []
        explosion = self.explosion
        if explosion is None:
            # A non-finite loss makes the sum non-finite: summed in C (a tenth of the cost of a
            # generator's test per loss), searched only then.
            finite = math.isfinite(sum(losses))
            first_bad = None if finite else next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
            last_logged = None if first_bad is None else first_bad - 1  # up to a divergence: the charts show it coming
        else:  # the range test: a loss that blows up is its end, not a failure
            self._read_explosion()
            exploded = None if explosion.exploded_at is None else explosion.exploded_at[0]
            first_bad = None
            # Up to and including the exploding step (its loss, when finite: the analysis
            # reads the explosion off the logged losses); the steps the window ran after it
            # are not the run's.
            last_logged = None if exploded is None else exploded - self.steps[0]
            if last_logged is not None and 0 <= last_logged < len(losses) and not math.isfinite(losses[last_logged]):
                last_logged -= 1
        steps, lrs = self.steps, self.lrs
        rows = [
            (steps[i], {"train_loss": losses[i], "lr": lrs[i], "grad_norm": norm})
            for i, norm in zip(self.logged, norms)
            if last_logged is None or i <= last_logged
        ]
        if self.log_rows is not None:
            self.log_rows(rows)  # the window's rows in one call (a reporter that offers it)
        else:
            for step, metrics in rows:
                self.reporter.log_metrics(step, metrics)
        if explosion is not None and explosion.exploded_at is not None and self.steps[0] <= explosion.exploded_at[0]:
            step, lr = explosion.exploded_at  # said once, at the step, by the window that holds it
            self.reporter.log_metrics(step, {"exploded_at_step": step, "exploded_at_lr": lr})
        if first_bad is not None:
            raise TrainingDiverged(self.steps[first_bad], losses[first_bad], self.lrs[first_bad])
        # Emptied in place: the training loop holds `steps`.
        for kept in (self.steps, self.lrs, self.losses, self.logged, self.norm_parts):
            kept.clear()

    def _read_explosion(self) -> None:
        """The range test's first exploding step, if it is in this window: noted with its lr."""
        explosion = self.explosion
        if explosion.exploded_at is None:
            first = explosion.first_exploding_step()
            if first is not None:
                explosion.exploded_at = (first, self.lrs[self.steps.index(first)])


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, n_classes: int) -> list[list[int]]:
    """Rows are true classes, columns predicted ones."""
    counts = torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).cpu().tolist()


def run_training(
    spec: JobSpec,
    reporter: Reporter | None = None,
    raw_data: RawData | None = None,
    datasets_dir: Path | None = None,
) -> TrainingResult:
    trainer = Trainer(spec, reporter, raw_data=raw_data, datasets_dir=datasets_dir)
    trainer.setup()
    return trainer.train()
