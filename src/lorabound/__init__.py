"""lorabound: find the LoRA boundary layer, drop the adapter above it, and measure what that costs."""

__version__ = "0.1.0"
