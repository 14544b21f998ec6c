"""Measuring models: streamed perplexity, log-likelihoods for lm-eval, inspection of checkpoints and run reports."""
