"""On-policy pairs: the generate and annotate stage kinds, sampling through vLLM or transformers
(sampling), reward models and functions (rewards) and scored samples turned into pairs
(binarize)."""
