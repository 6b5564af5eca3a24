"""Tiny models of every family on 8x8 images, shared by the export and sampling-runtime tests."""

from __future__ import annotations

import torch

from genmodels.models import build_model
from genmodels.models.base import ImageSpec

BINARY = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=3)
GREY = ImageSpec(channels=1, height=8, width=8, levels=256, num_classes=3)
SMALL_GAN = {"latent_dim": 4, "g_width": 4, "d_width": 4, "d_features": 8, "embed_dim": 4}
SMALL_RNN = {"num_layers": 2, "hidden_channels": 4, "head_hidden": 6}
# case -> (family, image, config overrides)
CASES = {
    "mixture_binary": ("mixture", BINARY, {"n_components": 3}),
    "mixture_8bit": ("mixture", GREY, {"n_components": 3, "conditional": True}),
    "vae": ("vae", BINARY, {"latent_dim": 3, "hidden": (16,)}),
    "cvae": ("cvae", GREY, {"latent_dim": 3, "hidden": (16,)}),
    "cvae_class_prior": ("cvae", BINARY, {"latent_dim": 3, "hidden": (8,), "architecture": "conv",
                                          "conv_channels": (4, 6), "class_prior": True}),
    # The quick preset's CVAE recipe: the label into every encoder stage, FiLM in every decoder stage.
    "cvae_film": ("cvae", BINARY, {"latent_dim": 3, "hidden": (8,), "architecture": "conv", "conv_channels": (4, 6),
                                   "class_prior": True, "label_film": True, "label_encoder_maps": True}),
    # Sampling from a latent mixture fit after training (every preset's VAE and CVAE).
    "vae_mixture": ("vae", BINARY, {"latent_dim": 3, "hidden": (16,), "latent_mixture": 4}),
    "cvae_mixture": ("cvae", BINARY, {"latent_dim": 3, "hidden": (8,), "architecture": "conv",
                                      "conv_channels": (4, 6), "class_prior": True, "label_film": True,
                                      "label_encoder_maps": True, "latent_mixture": 3}),
    "gan": ("gan", BINARY, SMALL_GAN),
    "gan_conditional": ("gan", BINARY, dict(SMALL_GAN, conditional=True)),
    # Row LSTMs of the presets read the whole row to their left (input_width = 2W-1) and where they are.
    "pixelrnn_row": ("pixelrnn", BINARY, dict(SMALL_RNN, layer="row", input_kernel=3, input_width=15,
                                              position_bias=True)),
    "pixelrnn_diagonal": ("pixelrnn", BINARY, dict(SMALL_RNN, layer="diagonal", conditional=True)),
}


def make_model(case: str):
    family, image, overrides = CASES[case]
    torch.manual_seed(0)
    model = build_model(family, image, **overrides)
    if family == "mixture":
        # Fit the mixture to random images so components differ (fresh ones are all alike).
        gen = torch.Generator().manual_seed(1)
        levels = torch.randint(0, image.levels, (40, *image.shape), generator=gen)
        y = torch.arange(40) % image.num_classes if model.conditional else None
        model.em_initialize(model.from_levels(levels), seed=0, y=y)
    if getattr(model.config, "class_prior", False):
        with torch.no_grad():  # zero-initialized class priors would all be N(0, I)
            model.prior_mu.normal_()
            model.prior_logvar.normal_(0.0, 0.3)
    if getattr(model.config, "label_film", False):
        with torch.no_grad():  # zero-initialized FiLM tables would be the identity
            for film in model.decoder.films:
                film.table.normal_(0.0, 0.3)
    if getattr(model.config, "latent_mixture", 0):
        # Fit to random images so components differ (unfitted ones are all the prior).
        gen = torch.Generator().manual_seed(2)
        x = (torch.rand(60, *image.shape, generator=gen) > 0.5).float()
        model.after_training([{"x": x[i : i + 20], "y": torch.arange(i, i + 20) % image.num_classes}
                              for i in range(0, 60, 20)], seed=0)
    if family == "pixelrnn" and model.conditional:
        with torch.no_grad():  # zero-initialized class biases would make conditioning vacuous
            model.gate_class_bias.normal_()
            model.head_class_bias.normal_()
    if family == "pixelrnn" and model.config.position_bias:
        with torch.no_grad():  # likewise a zero-initialized position bias
            model.position_bias.normal_()
    return model.eval()
