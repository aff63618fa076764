"""Training Ember models with the Hugging Face Trainer: recipe arguments (`arguments`), the run plan (`plan`) and
the run shell the recipes share (`run`), the pretraining Trainer and collator (`trainer`), the pretraining
objectives' collators (`objectives`: clm, prefix_lm, mlm, ul2), callbacks (`callbacks`), optimizer groups and
schedules (`optim`, `muon`), resuming (`checkpoints`), the pretraining pieces (`pretraining`), LoRA/QLoRA
finetuning (`finetune`) and classifier finetuning (`classification`). What a run leaves for people to read is in
`reporting/`."""
