"""mmkd_jax: multimodal-to-unimodal knowledge distillation in JAX/Flax."""
