"""On-disk caches of VAE latents and text embeds: content-addressed safetensors (store), their builders
(latents, text_embeds) and `build_caches` / `prepare_caches` (build)."""
