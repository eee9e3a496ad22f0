"""Model families (parts, LoRA defaults, processor quirks), loading, and offline tiny models."""
