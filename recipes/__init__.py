"""Ember's recipes: thin scripts over the library, each runnable (`python recipes/<name>.py --config ...`) and
importable (`from recipes import pretrain; pretrain.main(["--config", ...])`)."""
