"""A training run's life: run (the whole launch), build (the parts, once), stages (one value per
stage for the Trainer), trainer (fit, epochs, evaluation), lr_sweep, schedule, precompute and
checkpoint (save, resume, preemption)."""
