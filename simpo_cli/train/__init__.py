"""Training stages: the SFT and preference stage kinds (Trainer subclasses), the Trainer's
arguments and metrics file (trainer), response log-probs of packed batches (logps), the loss
of each method over those (objectives) and the console lines while training (console)."""
