"""Which layers to binarize (the layer policy), ``binarize_`` and loading models from timm, the hub or a file."""
