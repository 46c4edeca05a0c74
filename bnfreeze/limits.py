"""Limits enforced before anything large is allocated. The README's Guarantees quote them."""

MAX_CONFIG_BYTES = 64 * 2**20  # the largest config.json / model_config read (EfficientNetV2L: ~2 MiB)
MAX_NESTING_DEPTH = 64  # nested models / wrappers below the top level
MAX_LAYERS = 100_000  # layers in one model, all levels
MAX_EXPANSION_RATIO = 200  # a compressed zip member may expand at most this many times
