"""Evaluation: lm-eval-compatible task files, exact metrics with standard errors,
batched log-likelihood scoring, result caching, comparisons and reports."""
