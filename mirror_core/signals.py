"""What the model says about each image, by name (a float each).

A module of its own, free of torch: the pipeline's CPU stages (decode, commit) build the
output schema from it without importing the model.
"""
SIGNALS = ("prob_fake", "logit_real", "logit_fake", "max_score", "entropy", "residual_norm")
