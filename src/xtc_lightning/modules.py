"""The LightningModules: fine-tuning one classifier, and distilling a student from a teacher.

Both share evaluation (``GlueModule``): one ``GlueSplitMetric`` per dev split,
``val/<split>/<metric>`` and ``val/score`` logged at the end of each validation
epoch, and the gathered predictions kept for the predictions files.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from xtc_lightning.config import OptimConfig
from xtc_lightning.distill import (
    DistillConfig,
    distill_forward,
    distill_losses,
    loss_weights_at,
    record_projections,
    teacher_needed,
)
from xtc_lightning.metrics import GlueSplitMetric, predictions_from_logits, task_score
from xtc_lightning.models import set_dropout
from xtc_lightning.quant import (
    clip_latent_weights,
    latent_weights,
    pull_latent_weights,
    set_quantization_enabled,
    set_weight_form,
)
from xtc_lightning.recipe import Recipe
from xtc_lightning.tasks import GlueTask, get_task

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def supervised_loss(task: GlueTask, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.is_regression:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels.long())


def log_train_losses(module: L.LightningModule, losses: dict[str, torch.Tensor]) -> dict:
    """Log each ``train/...`` loss (the mean over all processes; ``train/loss`` on the progress bar)
    and return what ``training_step`` returns: ``loss``, the ``train/loss`` to optimize, and the
    detached values under their logged names, which ``callbacks.FiniteLoss`` checks."""
    for name, value in losses.items():
        module.log(name, value, prog_bar=name == "train/loss", sync_dist=True)
    return {"loss": losses["train/loss"], **{name: value.detach() for name, value in losses.items()}}


def adamw_with_linear_schedule(
    module: L.LightningModule, optim: OptimConfig, lr: float, recipe: Recipe | None = None
):
    """AdamW (no decay on biases and LayerNorm weights), linear warm-up then linear decay to 0.

    Only trainable parameters are optimized (a distillation teacher has none). With a
    ``recipe``, the latent weights of quantized modules form their own group: lr
    ``recipe.latent_lr`` (``lr`` when null) on the same schedule, decay ``recipe.latent_weight_decay``.
    """
    latent = {id(p) for p in latent_weights(module)} if recipe is not None else set()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if p.ndim < 2]  # biases, LayerNorm weights and biases
    decay = [p for n, p in named if p.ndim >= 2 and id(p) not in latent]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if latent:
        groups.append(
            {
                "params": [p for n, p in named if id(p) in latent],
                "weight_decay": recipe.latent_weight_decay,
                "lr": lr if recipe.latent_lr is None else recipe.latent_lr,
            }
        )
    optimizer = torch.optim.AdamW(
        groups,
        lr=lr,
        betas=optim.betas,
        eps=optim.eps,
    )
    trainer = module.trainer
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    warmup = min(total, round(optim.warmup_epochs * total / epochs))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class GlueModule(L.LightningModule):
    """Shared evaluation of the model returned by ``evaluated_model()`` on every dev split."""

    def __init__(self, task_name: str):
        super().__init__()
        self.task = get_task(task_name)
        self.val_metrics = nn.ModuleList([GlueSplitMetric(self.task) for _ in self.task.dev_splits])
        self.last_val: dict = {}
        # split -> (index, prediction, label, class probabilities or None)
        self.last_predictions: dict[str, tuple] = {}

    def evaluated_model(self) -> nn.Module:
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.evaluated_model()(**model_inputs(batch)).logits
        preds = predictions_from_logits(self.task, logits)
        probs = None if self.task.is_regression else logits.float().softmax(-1)
        self.val_metrics[dataloader_idx].update(batch["index"], preds, batch["labels"], probs)

    def on_validation_epoch_end(self) -> None:
        per_split = {}
        for split, metric in zip(self.task.dev_splits, self.val_metrics, strict=True):
            if not metric.update_called:
                continue
            per_split[split] = metric.compute()
            with metric.sync_context():
                self.last_predictions[split] = (*metric.gathered(), metric.gathered_probs())
            metric.reset()
            for name, value in per_split[split].items():
                if name != "score" or len(self.task.dev_splits) > 1:
                    self.log(f"val/{split}/{name}", value)
        if len(per_split) == len(self.task.dev_splits):
            score = task_score(self.task, per_split)
            self.log("val/score", score, prog_bar=True)
            self.last_val = {"splits": per_split, "score": score}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["last_val"] = self.last_val  # a resumed stage reports its last epoch too

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.last_val = checkpoint.get("last_val", {})


class ClassifierModule(GlueModule):
    """Fine-tune one model on the task's labels (the teacher stage)."""

    def __init__(self, model: nn.Module, task_name: str, optim: OptimConfig, lr: float):
        super().__init__(task_name)
        # plain values: the checkpoints are read back with weights_only=True
        self.save_hyperparameters({"task_name": task_name, "optim": optim.as_dict(), "lr": lr})
        self.model = model.train()  # from_pretrained returns eval mode (dropout off)
        self.optim = optim
        self.lr = lr

    def evaluated_model(self) -> nn.Module:
        return self.model

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.model(**model_inputs(batch)).logits
        return log_train_losses(self, {"train/loss": supervised_loss(self.task, logits, batch["labels"])})

    def configure_optimizers(self):
        return adamw_with_linear_schedule(self, self.optim, self.lr)


class DistillModule(GlueModule):
    """Distil a trainable student from a frozen teacher (the reduce and quantize stages).

    The teacher stays in eval mode with no gradient and outside the optimizer and DDP (no
    broadcast or gradient sync of its weights); its weights are not written into checkpoints
    (they are re-attached from the live teacher on load).
    With a quant config, the student's quantized layers are switched on from
    ``quant.start_step`` optimizer steps on, and the ``recipe`` (quantize stage) sets their
    weight form per optimizer step in training and the final form for every evaluation.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        task_name: str,
        layers: list[int],
        distill: DistillConfig,
        optim: OptimConfig,
        lr: float,
        quant=None,
        recipe: Recipe | None = None,
    ):
        super().__init__(task_name)
        self.save_hyperparameters(  # plain values: the checkpoints are read back with weights_only=True
            {
                "task_name": task_name,
                "layers": list(layers),
                "distill": distill.as_dict(),
                "optim": optim.as_dict(),
                "lr": lr,
            }
        )
        self.teacher = teacher.eval().requires_grad_(False)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self,
            [f"teacher.{name}" for name, _ in teacher.named_parameters()]
            + [f"teacher.{name}" for name, _ in teacher.named_buffers()],
        )
        self.student = student.train()
        if recipe is not None and recipe.dropout is not None:
            set_dropout(student, recipe.dropout)
        self.layers = list(layers)
        self.distill = distill
        self.optim = optim
        self.lr = lr
        self.quant = quant
        self.recipe = recipe
        self.weights = self._scaled({k: float(v) for k, v in distill.weights.items()})

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # never dropout in the teacher
        return self

    def evaluated_model(self) -> nn.Module:
        return self.student

    def _scaled(self, weights: dict[str, float]) -> dict[str, float]:
        if self.recipe is not None:
            weights["attention"] *= self.recipe.attention_scale
        return weights

    def _switch_quantization(self, training: bool) -> None:
        if self.quant is None:
            return
        set_quantization_enabled(self.student, self.quant.active_at(self.global_step))
        if self.recipe is None or not self.quant.weight.enabled:
            return
        if not training:  # evaluation: always the final form
            set_weight_form(self.student, self.quant)
            return
        per_epoch = self.trainer.estimated_stepping_batches / max(1, self.trainer.max_epochs)
        step = self.global_step
        set_weight_form(
            self.student,
            self.quant,
            lambda final: self.recipe.weight_spec_at(step, per_epoch, final),
            self.recipe.mix_at(step, per_epoch),
            self.recipe.scale_gradient,
        )

    def on_train_epoch_start(self) -> None:
        self.weights = self._scaled(
            loss_weights_at(self.distill, self.current_epoch, self.trainer.max_epochs)
        )

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._switch_quantization(training=True)

    def on_validation_start(self) -> None:
        self._switch_quantization(training=False)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        inputs = model_inputs(batch)
        w = self.weights
        direction = () if self.recipe is None else self.recipe.direction_losses
        hidden = w["hidden"] > 0
        record = w["attention"] > 0 and "attention" in direction  # q, k, v instead of the scores
        scores = w["attention"] > 0 and not record
        teacher_out, teacher_qkv = None, None
        if teacher_needed(w):
            with torch.no_grad(), record_projections(self.teacher, record) as teacher_qkv:
                teacher_out = distill_forward(self.teacher, inputs, scores, hidden)
        with record_projections(self.student, record) as student_qkv:
            student_out = distill_forward(self.student, inputs, scores, hidden)
        losses = distill_losses(
            student_out,
            teacher_out,
            inputs["attention_mask"],
            self.layers,
            w,
            temperature=self.distill.temperature,
            regression=self.task.is_regression,
            labels=batch["labels"],
            direction=direction,
            projections=(student_qkv, teacher_qkv) if record else None,
        )
        named = {"train/loss" if k == "total" else f"train/{k}_loss": v for k, v in losses.items()}
        return log_train_losses(self, named)

    def configure_optimizers(self):
        return adamw_with_linear_schedule(self, self.optim, self.lr, self.recipe)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.recipe is None or not self.quant.active_at(self.global_step):
            return
        if self.recipe.latent_clip is not None:
            clip_latent_weights(self.student, self.recipe.latent_clip)
        if self.recipe.latent_pull is not None:
            pull_latent_weights(self.student, self.recipe.latent_pull)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
