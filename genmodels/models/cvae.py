"""Conditional VAE (Sohn et al.): encoder q(z|x, y) and decoder p(x|z, y) both see the label.

Because the decoder is told the class, the latent is free to carry what the label does not:
style (thickness, slant, pose). Decoding one image's z with every label gives the lecture's
"analogies": the same style drawn as each class. The network code is the VAE's
(``vae.py``), built with a one-hot label input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from genmodels.models.base import ModelConfig
from genmodels.models.vae import VAE, VAEConfig

__all__ = ["CVAE", "CVAEConfig"]


@dataclass(frozen=True)
class CVAEConfig(VAEConfig):
    conditional: bool = True


class CVAE(VAE):
    family: ClassVar[str] = "cvae"
    config_class: ClassVar[type[ModelConfig]] = CVAEConfig
    _requires_conditional: ClassVar[bool] = True

    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        # As the VAE's quick preset; IWAE k=100 for fast evaluation (looser than k>=1000).
        "quick": {
            "model": {"latent_dim": 20, "architecture": "mlp", "hidden": (512, 256), "iwae_k": 100},
            "train": {"epochs": 15, "batch_size": 128, "lr": 1e-3, "max_train_examples": 20000,
                      "early_stopping_patience": None},
        },
        # GPU. Targets: >= 90% of class-conditional samples classified as their label, and an
        # NLL at least as good as the VAE's. Same network and schedule as the VAE's full preset.
        "full": {
            "model": {"latent_dim": 32, "architecture": "conv", "hidden": (512,), "conv_channels": (64, 128),
                      "iwae_k": 5000, "kl_warmup_epochs": 10},
            "train": {"epochs": 150, "batch_size": 128, "lr": 1e-3, "scheduler": "cosine",
                      "early_stopping_patience": 20, "grad_clip": 100.0},
        },
    }

    @torch.no_grad()
    def analogies(self, x: torch.Tensor, labels: Any) -> torch.Tensor:
        """[B, num_classes, C, H, W]: row b decodes the posterior mean of (x[b], labels[b])
        with every class label in turn; column ``labels[b]`` is ``reconstruct(x, labels)[b]``."""
        x = self._check_x(x)
        return self._analogies(x, self.check_labels(labels, x.shape[0]))

    def _analogies(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Export path of ``analogies``: int64 labels [B] in, plain tensor ops, no value checks."""
        mu, _ = self.encoder(x, self._onehot(labels))
        k = self.image.num_classes
        z = mu.repeat_interleave(k, dim=0)  # [B*K, latent]: row b*K + c is (image b, class c)
        every_class = torch.eye(k, dtype=mu.dtype, device=mu.device).repeat(mu.shape[0], 1)
        return self._mean(self.decoder(z, every_class)).reshape(mu.shape[0], k, *self.image.shape)
