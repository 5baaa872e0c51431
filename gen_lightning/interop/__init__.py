"""Hugging Face formats in and out: adapters around diffusers' and transformers' modules (a Stable Diffusion VAE or
CLIP text tower from a local folder) and the exact key maps from our networks to theirs (export).

diffusers and transformers are the `hf` extra: nothing here imports them at module level, so gen_lightning runs
without them until such a folder is given. No module here downloads anything: every load is `local_files_only`.
"""
