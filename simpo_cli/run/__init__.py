"""The orchestrator: a recipe's pipeline as stage instances (instances; with rounds, each
round's generate, annotate and preference) run in order, each in its folder (pipeline), the
registry of stage kinds (stages), the record of each round (rounds), the dry run (plan), every
user path checked before work starts (paths), the training curves of a run (curves), the model
card of each model folder (card) and the pushes of finished stages to the Hugging Face Hub
(hub)."""
