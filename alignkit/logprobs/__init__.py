"""Log-probs of completion tokens: `completion` holds THE log-prob primitive (`completion_logps`, the
output head applied a chunk at a time; its encoder-decoder and rollout-batch forms), `transforms` what the
logits go through first (each model family's logit transform, top-k / top-p truncation)."""
