# A LoRA reward model: adapters on every linear layer plus the (always fully trained) score head.
# Fits a larger base on one GPU; the saved checkpoint has the adapters merged.
# python reward.py configs/reward_ultrafeedback.py configs/reward_lora.py
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = "all"
lr = 1e-4                      # ~10x the full fine-tune LR
min_lr = 1e-5
