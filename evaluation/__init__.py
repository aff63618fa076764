"""Evaluating checkpoints: sliding-window perplexity and bits per byte (`perplexity`), lm-eval downstream
tasks (`downstream`), text generation (`generation`), the scored tokens of each pretraining objective
(`objectives`: masked-token loss and accuracy, pseudo-perplexity, suffix bits per byte) and classifier scores
(`classification`: accuracy, macro-F1, entity-level F1). Models come from `modeling.loading`."""
