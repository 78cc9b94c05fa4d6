"""Evaluation: the evaluate stage and `simpo eval` over checkpoints (checkpoints), pair metrics
(pairs), benchmark questions and answers (benchmarks, answers), reward-model win rates
(winrate), lm-evaluation-harness (lmeval) and the comparison table and plots (compare)."""
