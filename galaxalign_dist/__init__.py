"""galaxalign_dist: GalaxAlign tri-modal CLIP fine-tuning for galaxy morphology at cluster scale."""

__version__ = "0.1.0"


def load_model(path):  # noqa: ANN001, ANN201 - thin lazy re-export keeps `import galaxalign_dist` light
    """Load an exported model directory (safetensors + config) without DeepSpeed or Ray."""
    from galaxalign_dist.evaluation.bundle import load_model as _load

    return _load(path)
