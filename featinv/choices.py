"""Names that the CLI's ``choices=`` and the modules that own them share, without importing torch
(``featinv --help`` loads no torch)."""

# What classifier-free guidance's unconditional branch drops: "features" = the zero feature map with
# the null context (what featinv trains for); "prompt" = the same feature map with the null context,
# so that only the prompt is guided on (the published FeatInv sampler's ``un_cond``).
GUIDANCE_MODES = ("features", "prompt")
