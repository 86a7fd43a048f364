"""The distillation objective as functions of tensors: no modules, no I/O.

``L = lambda_noise * L_noise + lambda_kd * L_kd + lambda_feat * L_feat`` (``lambda_noise`` is 1 unless the
teacher is no denoiser, as with the random-weight test models), every term a mean squared error computed in float32
(autocast may hand over half-precision outputs):

* ``L_noise``: student prediction vs the scheduler's target (epsilon, or v for v-prediction models);
* ``L_kd``: student vs teacher UNet output;
* ``L_feat``: mean over the replaced layers of student vs teacher self-attention output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distlin.errors import UsageError

TERMS = ("loss", "loss_noise", "loss_kd", "loss_feat")


@dataclass(frozen=True)
class LossWeights:
    """The lambdas of the objective."""

    noise: float = 1.0
    kd: float = 0.5
    feat: float = 0.5


@dataclass
class LossTerms:
    """The total loss (to backpropagate) and its unweighted terms (to log)."""

    total: torch.Tensor
    noise: torch.Tensor
    kd: torch.Tensor
    feat: torch.Tensor

    def detached(self) -> torch.Tensor:
        """The four values in :data:`TERMS` order, as one float32 tensor (one all-reduce for all of them)."""
        return torch.stack([self.total, self.noise, self.kd, self.feat]).detach().float()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


def diffusion_target(
    prediction_type: str, scheduler: object, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet was trained to predict: the noise, the velocity ``sqrt(a) eps - sqrt(1-a) x0``, or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise UsageError(f"unsupported scheduler prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    weights: LossWeights,
) -> LossTerms:
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"got {len(student_features)} student and {len(teacher_features)} teacher features")
    noise = mse(student, target)
    kd = mse(student, teacher)
    feat = torch.stack([mse(s, t) for s, t in zip(student_features, teacher_features, strict=True)]).mean()
    return LossTerms(weights.noise * noise + weights.kd * kd + weights.feat * feat, noise, kd, feat)


def squared_error_sums(prediction: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(sum |p - r|^2, sum |r|^2)``: summed over many samples, their ratio is the relative MSE."""
    p, r = prediction.double(), reference.double()
    return float((p - r).square().sum()), float(r.square().sum())
