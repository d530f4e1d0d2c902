# LoRA SFT on all linear layers; writes an adapter-only checkpoint (base path + adapters), which
# model_from_checkpoint and chat.py load. --merge_lora_on_save=True writes a full merged checkpoint instead.
# $ python sft.py configs/sft_lora.py
# $ torchrun --nproc_per_node=4 sft.py configs/sft_lora.py --parallel=fsdp
out_dir = "out/sft_lora"
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = "all"
lr = 3e-3                 # LoRA wants ~10x the full fine-tuning LR (tiny default model: 2e-3 full)
min_lr = 3e-4
