"""What a run records: wandb and the history file (tracker, history), and its pictures (pictures, report)."""
