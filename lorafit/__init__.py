"""lorafit: config-driven LoRA / QLoRA fine-tuning with exact ΔW spectrum analysis and verified merges."""

__version__ = "0.1.0"
