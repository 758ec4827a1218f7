"""Segmentation models from segmentation-models-pytorch, checked before anything runs."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch

from covidseg.config import DeviceChoice
from covidseg.errors import CovidSegError
from covidseg.modelnames import check_model_names


def build_model(
    arch: str, encoder: str, encoder_weights: str | None, classes: int
) -> torch.nn.Module:
    """One-channel CT in, `classes` logit maps out."""
    check_model_names(arch, encoder)
    try:
        model: torch.nn.Module = smp.create_model(  # SMP is untyped
            arch,
            encoder_name=encoder,
            encoder_weights=encoder_weights,
            in_channels=1,
            classes=classes,
        )
    except (OSError, ConnectionError, RuntimeError) as error:
        if encoder_weights is None:
            raise
        raise CovidSegError(
            f"train.encoder_weights: {encoder_weights} weights for {encoder} could not be "
            f"fetched ({type(error).__name__}); they need network access to the Hugging Face "
            "hub. Use train.encoder_weights: null offline"
        ) from None
    except (KeyError, ValueError) as error:
        raise CovidSegError(f"cannot build {arch} with encoder {encoder}: {error}") from None
    return model


def resolve_device(choice: DeviceChoice) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit choice must be available."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if choice == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available[choice]:
        raise CovidSegError(f"train.device: {choice} is not available on this machine")
    return torch.device(choice)
