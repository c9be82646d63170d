"""Training: objects built from the config (build), the loop (trainer), one optimizer step (step),
the recipe's inputs and schedule, checkpoints (checkpoint, integrity, resume), stopping on a signal (preempt),
and the whole job (job)."""
