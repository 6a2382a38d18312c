"""``featinv convert``: the published FeatInv checkpoint (a ControlLDM single file) -> a featinv model
folder and the Stable Diffusion base folder it refers to (:mod:`featinv.models.published`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from featinv.choices import DTYPES
from featinv.cli.options import add_dtype_arg, add_source_args
from featinv.errors import FeatInvError
from featinv.limits import arg


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert, check everything before writing (the file, the classifier, memory and disk), then
    write the base (or reuse an identical one) and the model, each atomically. The checkpoint is
    memory-mapped and its tensors written one at a time in the output dtype: the peak memory is
    about the checkpoint as stored plus the text encoder (``published.footprint``)."""
    from featinv.cli.options import new_extractor, torch_dtype
    from featinv.models import FeatInvModel
    from featinv.models.base import weights_fingerprint
    from featinv.models.published import (
        PUBLISHED_CLASSIFIER,
        PUBLISHED_INPUT_SIZE,
        footprint,
        read_checkpoint,
        read_config,
    )
    from featinv.resources import require_disk, require_memory

    out = Path(args.out)
    base_out = Path(args.base_out) if args.base_out else out.with_name(f"{out.name}-base")
    for flag, path in (("--out", out), ("--base-out", base_out)):
        if path.exists() and not path.is_dir():
            raise FeatInvError(f"{flag} {path} exists and is not a folder")
    if out.resolve() == base_out.resolve():
        raise FeatInvError("--out and --base-out must be two folders (the model refers to its base)")
    named = args.classifier is not None or args.classifier_module is not None
    given = (args.classifier_kwargs, args.layer, args.input_size, args.source, args.classifier_normalization)
    if not named and any(value is not None for value in given):
        raise FeatInvError(
            "--classifier-kwargs, --layer, --input-size, --source and --classifier-normalization go with --classifier"
        )
    dtype = torch_dtype(args.dtype)
    text_config = json_file_arg("--text-encoder-config", args.text_encoder_config)
    config = read_config(args.config)
    state = read_checkpoint(args.checkpoint)  # the file's layout, before the classifier is built
    extractor = new_extractor(
        args.source,
        args.classifier if named else PUBLISHED_CLASSIFIER,
        args.classifier_module,
        layer=args.layer,
        weights=args.classifier_weights,
        kwargs_text=args.classifier_kwargs,
        input_side=args.input_size or (None if named else PUBLISHED_INPUT_SIZE),
        normalization_text=args.classifier_normalization,
    )
    needs = footprint(state, dtype)
    require_memory(needs.memory, f"converting {args.checkpoint}")
    model = FeatInvModel.from_single_file(
        state,
        extractor,
        config=config,
        tokenizer=args.tokenizer,
        text_encoder_config=text_config,
        prompt=args.prompt,
        store_classifier=args.classifier_weights is not None,
        dtype=None,  # the checkpoint's tensors as stored, written from the mapped file in --dtype
    )
    fingerprint = weights_fingerprint(model.unet, model.vae, stored_as=dtype)  # reads every base weight: once
    reused = _existing_base(base_out, fingerprint)
    classifier = sum(t.numel() * t.element_size() for t in extractor.classifier.state_dict().values())
    outputs = [("the model", out, needs.model + (classifier if args.classifier_weights else 0))]
    require_disk(
        outputs + ([] if reused else [("its base", base_out, needs.base)]), ", or give --out/--base-out elsewhere"
    )
    if reused:
        model.base, model.base_fingerprint = str(base_out.resolve()), fingerprint
    else:
        model.save_base(base_out, dtype=dtype, fingerprint=fingerprint)
    model.save_pretrained(out, dtype=dtype)
    height, width = model.image_size
    print(
        f"converted {args.checkpoint} -> {out} ({extractor.spec.describe()}; images {height}x{width}; guidance on "
        f"the prompt, as published; weights in {args.dtype}), its base {'reused' if reused else 'written'} at "
        f"{base_out}"
    )
    if args.classifier_weights is None:
        print("note: no --classifier-weights given, so the model stores no classifier: pass them to reconstruct images")
    return 0


def _existing_base(folder: Path, fingerprint: str) -> bool:
    """Whether ``folder`` already holds this base (same UNet and VAE weights): then it is shared,
    not written again. Any other existing folder is refused. The folder's weights are read one
    tensor at a time where they are plain safetensors (``folder_fingerprint``), else loaded."""
    if not folder.exists():
        return False
    from featinv.models.base import folder_fingerprint, load_base, weights_fingerprint

    found = folder_fingerprint(folder)
    if found is None:
        try:
            loaded = load_base(str(folder))
        except FeatInvError as error:
            raise FeatInvError(f"--base-out {folder} exists and is not a base folder ({error})") from error
        found = weights_fingerprint(loaded.unet, loaded.vae)
    if found != fingerprint:
        raise FeatInvError(f"--base-out {folder} exists and holds another base: give a new folder")
    return True


def json_file_arg(flag: str, path: str | None) -> dict | None:
    """The JSON object in the file a flag names (None when not given); anything else is one line."""
    if path is None:
        return None
    from featinv.files import read_json_object

    if not Path(path).is_file():
        raise FeatInvError(f"{flag} {path} is not a file")
    return read_json_object(path)


def add_convert_command(commands) -> None:
    """Add ``convert`` to the CLI's subcommands."""
    convert = commands.add_parser(
        "convert", help="the published FeatInv checkpoint (ControlLDM .ckpt/.safetensors) -> a featinv model folder"
    )
    convert.add_argument("--checkpoint", required=True, help="e.g. control_featinv_convnext_fin.ckpt")
    convert.add_argument("--out", required=True, help="the model folder to write")
    convert.add_argument(
        "--base-out",
        help="the SD base folder it refers to (default: OUT-base; an identical one is reused)",
    )
    convert.add_argument("--config", help="its ControlLDM YAML (default: the published cldm_featinv_convnext.yaml)")
    convert.add_argument(
        "--tokenizer", help="a CLIP tokenizer folder (an SD folder's tokenizer/): needed only for another --prompt"
    )
    convert.add_argument(
        "--text-encoder-config", help="a CLIPTextConfig JSON file (default: CLIP ViT-L/14's, as published)"
    )
    convert.add_argument(
        "--classifier", help="timm model name (default: convnext_base.fb_in22k_ft_in1k at 288 px, as published)"
    )
    add_source_args(convert, applies="with --classifier: ")
    convert.add_argument(
        "--classifier-kwargs",
        help="with --classifier: JSON of extra constructor arguments (transformers: config fields)",
    )
    convert.add_argument(
        "--layer", help="with --classifier: its layer (timm: forward_features by default; see create --help)"
    )
    convert.add_argument("--input-size", type=arg("input_size"), help="with --classifier: its input side in pixels")
    convert.add_argument(
        "--classifier-weights",
        help="the classifier's weights (e.g. timm's model.safetensors): stored in the model",
    )
    add_dtype_arg(
        convert, DTYPES, "fp32", "the dtype the weights are written in (fp16 or bf16: half the disk; load as float32)"
    )
    convert.add_argument(
        "--prompt",
        help="the fixed prompt (default: the published one, 'a high-quality, ..., image, ')",
    )
    convert.set_defaults(func=cmd_convert)
