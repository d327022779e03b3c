"""Training: the loop (trainer.py), one SAE being trained (member.py), sweep groups (group.py), schedules,
running statistics, checkpoints, the run folder, and validation during training."""
