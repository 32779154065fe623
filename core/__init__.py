"""Host-independent method code: torch, numpy, scipy, einops and opencv only.

Nothing here imports ComfyUI or diffusers (the diffusers binding lives in `core.diffusers_binding`
and is the only module that does). Both hosts call these functions, so every formula has one home.
"""
