"""Noising and one-step x0 prediction (SPEC steps 3 and 5, paper Eq. 1-2).

Always driven by the checkpoint's own alpha-bar table: nothing here hard-codes a schedule
except `scaled_linear_alphas_cumprod`, which rebuilds SD's published one from its betas.
"""

from __future__ import annotations

import math

import torch

from ..errors import G4SegError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_steps: int = 1000) -> torch.Tensor:
    """SD1/SD2/SDXL's 'scaled_linear' training schedule, float64 [num_steps]."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_bar_at(alphas_cumprod: torch.Tensor, timestep: int) -> float:
    if not 0 <= int(timestep) < len(alphas_cumprod):
        raise G4SegError(f"timestep {timestep} is outside the model's schedule 0..{len(alphas_cumprod) - 1}")
    return float(alphas_cumprod[int(timestep)])


def sigma_from_alpha_bar(alpha_bar: float) -> float:
    """k-diffusion noise level of a DDPM step: sqrt((1 - ab) / ab)."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def _check_alpha_bar(alpha_bar_t: float) -> float:
    alpha_bar_t = float(alpha_bar_t)
    if not 0.0 < alpha_bar_t < 1.0:
        raise G4SegError(f"alpha_bar_t={alpha_bar_t} must lie strictly between 0 and 1")
    return alpha_bar_t


def add_noise(z0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps."""
    if z0.shape != noise.shape:
        raise G4SegError(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(z0.shape)}")
    ab = _check_alpha_bar(alpha_bar_t)
    return math.sqrt(ab) * z0 + math.sqrt(1.0 - ab) * noise


def predict_x0(z_t: torch.Tensor, model_output: torch.Tensor, alpha_bar_t: float,
               prediction_type: str) -> torch.Tensor:
    """Eq. 2: the clean latent implied by one model call at step t."""
    ab = _check_alpha_bar(alpha_bar_t)
    if prediction_type == "epsilon":
        return (z_t - math.sqrt(1.0 - ab) * model_output) / math.sqrt(ab)
    if prediction_type == "v_prediction":
        return math.sqrt(ab) * z_t - math.sqrt(1.0 - ab) * model_output
    raise G4SegError(f"prediction_type={prediction_type!r}: choose one of {PREDICTION_TYPES}")
