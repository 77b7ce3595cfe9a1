"""Which of a study's trials may train together as one pack: the spec side of packing.

Torch-free, so that jobs/ (a worker claiming a pack's mates, a study deciding how many
trials to keep queued) and trainer/packed.py (the packed recipe) read one rule.

Two trials pack when their specs differ only in PACKABLE_FIELDS (`pack_key` equal) and
neither has an `unpackable_reason`: the same dataset, model, batch size, epochs, loss,
optimizer family, device and checkpoint cadence; the seed, the optimizer's
hyperparameters, the schedule, gradient clipping and the logging interval may differ.
"""

from __future__ import annotations

from typing import Any

from jobs.spec import ImageDataset, JobSpec

# Spec fields a pack's trials may differ in; every other field (including ones added later)
# must be equal for two trials to pack.
PACKABLE_FIELDS = {
    "name", "experiment", "seed", "optimizer", "schedule", "clip_grad_norm", "log_every_steps",
    "max_attempts", "timeout_s",
}
PACKED_ARCHS = ("mlp", "cnn", "rnn", "lstm", "gru")
NOT_PACKED_ARCHS = {
    "transformer": "attention blocks are not stacked over trials yet",
    "resnet": "residual blocks are not stacked over trials yet",
}
# Measured with bench/packing.py on a 2-core CPU: packs of recurrent trials ran slower
# than the same trials one after another (trainer/packed.py's not_worthwhile_reason).
SLOWER_PACKED_ON_CPU = {"rnn", "lstm", "gru"}


def pack_key(spec: JobSpec) -> str:
    """Equal keys: the two specs can train as one pack (the optimizer's family stays in the key)."""
    fields = spec.model_dump(mode="json", exclude=PACKABLE_FIELDS)
    fields["optimizer_family"] = spec.optimizer.name
    return repr(sorted(fields.items()))


def unpackable_reason(spec: JobSpec) -> str | None:
    if spec.model.arch not in PACKED_ARCHS:
        return f"{spec.model.arch}: {NOT_PACKED_ARCHS.get(spec.model.arch, 'not stacked over trials')}"
    model = spec.model
    if getattr(model, "bidirectional", False):
        return f"{model.arch}: bidirectional recurrent layers are not stacked over trials yet"
    if getattr(model, "num_layers", 1) > 1 and getattr(model, "dropout", 0) > 0 and model.arch in ("rnn", "lstm", "gru"):
        return f"{model.arch}: dropout between recurrent layers draws inside torch's fused kernel; it runs alone"
    # The speed settings of issue 12 (precision, compile) are the solo loop's; a pack trains fp32, eager.
    if getattr(spec, "compile", False) or getattr(spec, "precision", None) not in (None, "fp32", "float32"):
        return "reduced precision and torch.compile are the solo loop's settings; packs train fp32, eager"
    if isinstance(spec.dataset, ImageDataset):
        return "image sets are standardised and augmented per batch on the device; packs take in-memory sets"
    if spec.diagnostics.in_loop or spec.diagnostics.hessian or spec.diagnostics.landscape or spec.diagnostics.per_class:
        return "diagnostics run on one model at a time"
    if getattr(spec.schedule, "stop_factor", None) is not None:
        return "the lr range test stops on its own loss; it runs alone"
    return None


def raw_pack_key(raw_spec: dict[str, Any]) -> str | None:
    """pack_key of a stored spec (a job row's JSON); None when it does not pack at all."""
    spec = JobSpec.model_validate(raw_spec)
    return None if unpackable_reason(spec) is not None else pack_key(spec)
