"""Binary layers (the training form) and the grouped training weights of a model's binary layers."""
