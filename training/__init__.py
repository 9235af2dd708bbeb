"""Two-stage Surgery-R1 training: SFT, then GRPO reinforcement fine-tuning (installed as surgery_r1_ros.training)."""
