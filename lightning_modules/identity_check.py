"""Refuse to pair a random stand-in identity encoder with a release-size transformer."""

from lightning_modules.identity_encoder import TinyRandomRecognizer

# The release's hidden width is 3072 (48 heads x 64); tiny test and demo models are far below.
RELEASE_SIZE_HIDDEN = 3072


def refuse_random_identity_at_release_size(identity_encoder, transformer_config) -> None:
    """A real run must never train on random identities: the tiny recogniser is for tests
    and the demo only."""
    if not isinstance(identity_encoder, TinyRandomRecognizer):
        return
    config = dict(transformer_config)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    if hidden >= RELEASE_SIZE_HIDDEN:
        raise ValueError(
            f"model.init_args.identity_encoder is TinyRandomRecognizer, a random stand-in for tests "
            f"and the demo, but the transformer is release size (hidden {hidden}); its identities "
            "would be noise. Configure the real ArcFace instead:\n"
            "  identity_encoder:\n"
            "    class_path: lightning_modules.identity_encoder.InsightFaceArcFace\n"
            "    init_args:\n"
            "      model_root: /path/to/EchoVideo/face_encoder   # holds models/antelopev2/")
