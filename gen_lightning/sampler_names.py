"""The sampler names, by the training objective whose network output each sampler reads. A leaf without torch, so the
command-line options (`--sampler` choices) stay light to import; diffusion.fast_samplers keys its registry by them."""

# eps / v / x0 prediction on a VP schedule; "consistency": the multistep sampler of consistency-distilled students
VP_SAMPLER_NAMES = ("ddim", "ddpm", "dpm++", "euler", "heun", "consistency")
FLOW_SAMPLER_NAMES = ("flow_euler", "flow_heun")  # rectified flow's velocity
EDM_SAMPLER_NAMES = ("edm_euler", "edm_heun")  # the x0 estimate of EDM's preconditioned denoiser
ALL_SAMPLER_NAMES = (*VP_SAMPLER_NAMES, *FLOW_SAMPLER_NAMES, *EDM_SAMPLER_NAMES)
SAMPLER_NAMES_BY_OBJECTIVE = {"vp": VP_SAMPLER_NAMES, "flow": FLOW_SAMPLER_NAMES, "edm": EDM_SAMPLER_NAMES}
