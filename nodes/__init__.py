"""ComfyUI adapter: one module per feature; the only code that imports comfy."""
