"""Evaluating checkpoints: sliding-window perplexity and bits per byte (`perplexity`), lm-eval downstream
tasks (`downstream`), and text generation (`generation`). Models come from `modeling.loading`."""
