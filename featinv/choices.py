"""Names that the CLI's ``choices=`` and the modules that own them share, without importing torch
(``featinv --help`` loads no torch)."""

# What classifier-free guidance's unconditional branch drops: "features" = the zero feature map with
# the null context (what featinv trains for); "prompt" = the same feature map with the null context,
# so that only the prompt is guided on (the published FeatInv sampler's ``un_cond``).
GUIDANCE_MODES = ("features", "prompt")

SAMPLERS = ("ddim", "dpmpp", "lcm")  # lcm: a consistency-distilled model's few-step sampler
ODE_SAMPLERS = ("ddim", "dpmpp")  # the base's own samplers (guided sampling, the analyses)
METHODS = ("featinv", "optimize", "guided", "hybrid")  # the ways to invert (featinv.analysis.studies)
BACKENDS = ("eager", "compiled", "fast", "onnx", "tensorrt")  # featinv.engine's denoisers
SERVE_BACKENDS = BACKENDS[:3]  # the web app's (no export folder)
DTYPES = ("fp32", "fp16", "bf16")  # inference dtypes (--dtype)
CACHE_DTYPES = ("float32", "float16", "bfloat16")  # a feature cache's storage (features cache --dtype)
# One dtype, two spellings: every --dtype takes both the short names and torch's (fp16 == float16).
DTYPE_SPELLINGS = dict(zip(DTYPES, CACHE_DTYPES, strict=True))


def dtype_choice(text: str, *, long: bool = False) -> str:
    """``text`` (fp16 or float16, half; any case) as the short name, or with ``long`` torch's; an
    unknown name is returned as it is, for argparse's ``choices`` to refuse."""
    name = {"half": "fp16", "float": "fp32"}.get(text.lower(), text.lower())
    name = {long_name: short for short, long_name in DTYPE_SPELLINGS.items()}.get(name, name)
    if name not in DTYPE_SPELLINGS:
        return text
    return DTYPE_SPELLINGS[name] if long else name


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # training autocast (accelerate's names)
DISTILL_TARGETS = ("consistency", "endpoint", "guidance", "trajectory")  # featinv.training.distill
DISTANCES = ("cosine", "l2")  # guided sampling's feature distance
FEATURE_MODES = ("spatial", "pooled")  # a feature map as it is, or its mean tiled (the paper's baseline)
FEATURE_SOURCES = ("timm", "torchvision", "transformers", "module")  # where a classifier comes from (featinv.sources)
# What the explorer does to a map's painted grid cells (featinv.analysis.regions): steer only there,
# ablate them (zero, or the examples' mean map), or paste the second image's map into them.
REGION_OPERATIONS = ("steer", "zero", "mean", "paste")
