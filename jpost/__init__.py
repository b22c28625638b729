"""jpost: JAX-native LLM post-training (SFT, preference optimisation, online RL)."""

__version__ = "0.1.0"
