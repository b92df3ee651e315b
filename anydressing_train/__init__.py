"""Training AnyDressing weights (GFE LoRA + Dressing-Attention) into the pack's native .safetensors.

Training-only: it uses ComfyUI's UNet, VAE and text encoder (so the pack reproduces the trained model exactly) and is
never imported by the node pack.
"""
