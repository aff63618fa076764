"""Training Ember models with the Hugging Face Trainer: recipe arguments (`arguments`), the pretraining Trainer
and collator (`trainer`), callbacks (`callbacks`), optimizer groups and schedules (`optim`), resuming
(`checkpoints`), the pretraining pieces (`pretraining`), LoRA/QLoRA finetuning (`finetune`), and the reports a
run leaves (`run_report`, `model_card`, `quickstart_report`)."""
