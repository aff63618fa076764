"""Training Ember models with the Hugging Face Trainer: recipe arguments (`arguments`), the pretraining Trainer
and collator (`trainer`), the pretraining objectives' collators (`objectives`: clm, prefix_lm, mlm, ul2), callbacks
(`callbacks`), optimizer groups and schedules (`optim`), resuming (`checkpoints`), the pretraining pieces
(`pretraining`), LoRA/QLoRA finetuning (`finetune`), classifier data (`classification`), and the reports a run
leaves (`run_report`, `model_card`, `quickstart_report`)."""
