"""The checks of scripts/gpu_check.py, one module each (packing, generation, lora, zero3,
evaluation, speed), and what they share (common.py). Each module has LIMIT_S, its time limit in
seconds, and run(ctx) -> Findings; a missing optional package raises common.Skip. Not part of
the simpo_cli package: scripts/gpu_check.py puts scripts/ on sys.path to import this folder."""
