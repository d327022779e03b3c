"""Training: one run of one SAE or a sweep group, on one process or many.

trainer.py        the run (`TrainingRun`): batches through every member, logging, checkpoints, the end
member.py         one SAE being trained: module, optimizer, statistics, RNG stream, log sink
group.py          what a run trains: one SAE or a sweep group (`train.group`) sharing every batch
settings.py       what `train` settings may be, checked before anything runs and held across a resume
schedule.py       learning-rate and sparsity schedules as pure functions of the step
stats.py          running statistics: window means for the log, per-latent firing counters
resample.py       resampling dead latents (`sae=relu`)
validation.py     validation on held-out store rows and loss recovered during training
runlog.py         where a run's records go: train_log.jsonl, W&B, and the printed lines with their clock
checkpoint.py     checkpoints without pickles: safetensors for tensors, JSON for the rest
run_folder.py     a run's folder: refusing to clobber a run, what resuming requires, what it records
resume.py         the checkpoint step every member resumes from, and putting a member back there
member_records.py each member's config.json, W&B name and group, and the log it writes to
transcoder.py     a transcoder's target store beside its input store
streaming.py      training on a store while it is harvested (`train.stream=true`)
distributed.py    data-parallel training: the process group, its collectives, which rank does what
latent_shards.py  SAEs wider than one device (`train.latent_shards=S`)
"""
