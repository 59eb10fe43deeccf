"""Pure-torch training objectives: ReNCE, GRPO, DAPO and online DPO."""
